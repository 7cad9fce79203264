"""Header fuzzing for the DICOM reader (tests/test_dicom_fuzz.py runs it in a subprocess, where a
crash of a native decoder shows as an exit code instead of killing pytest).

    python tests/dicom_fuzz.py FOLDER   # mutate the seed files of FOLDER/seed, read every mutant

Each mutant changes one header field of a valid file (native or RLE, 8 or 16 bits) and is read
twice: by `trainer.data.dicom.read_slice` and by pydicom's pure-Python decoders. The reader must
either refuse the file (an exception, which `read_series` turns into a skipped slice) or return
exactly the pixels pydicom decodes, in "bright = high signal" form (a MONOCHROME1 file mirrored
over its stored bits, computed here from pydicom's header), and exactly the InstanceNumber pydicom
reads (-1 when there is none). Prints one JSON line: counts and every disagreement.
"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pydicom

# unsigned shorts, patched in place in the file's bytes (pydicom would re-encode or refuse)
US_FIELDS = {"Rows": 0x0010, "Columns": 0x0011, "BitsAllocated": 0x0100, "BitsStored": 0x0101,
             "HighBit": 0x0102, "PixelRepresentation": 0x0103, "SamplesPerPixel": 0x0002}
US_VALUES = {
    "Rows": lambda v: [0, 1, v - 1, v + 1, v // 2, 2 * v, 200, 4096, 65535],
    "Columns": lambda v: [0, 1, v - 1, v + 1, v // 2, 2 * v, 4096, 65535],
    "BitsAllocated": lambda v: [0, 1, 8, 12, 32, 64, 255],
    "BitsStored": lambda v: [0, 1, 8, 15, 16, 17, 32],
    "HighBit": lambda v: [0, 7, 15, 16, 31],
    "SamplesPerPixel": lambda v: [0, 2, 3, 4],
    "PixelRepresentation": lambda v: [1, 2],
}
# the same length in bytes, so the file meta stays consistent: native <-> RLE <-> big endian
SYNTAXES = [b"1.2.840.10008.1.2.1\0", b"1.2.840.10008.1.2.5\0", b"1.2.840.10008.1.2.2\0"]
# strings, rewritten by pydicom (it keeps the pixel data as it is)
STRINGS = {"NumberOfFrames": ["0", "1", "2", "1000"],
           "PhotometricInterpretation": ["MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL",
                                         "MONOCHROME", "ARGB", "monochrome1"],
           "InstanceNumber": ["0", "-5", "5046", "2147483647", "99999999999", None]}  # None: deleted


def _patch_us(buf: bytes, group: int, element: int, value: int) -> bytes:
    tag = group.to_bytes(2, "little") + element.to_bytes(2, "little")
    for key in (tag + b"US\x02\x00", tag + b"\x02\x00\x00\x00"):  # explicit VR, implicit VR
        i = buf.find(key, 132)
        if i >= 0:
            return buf[:i + 8] + value.to_bytes(2, "little") + buf[i + 10:]
    raise ValueError(f"({group:04X},{element:04X}) not found")


def mutants(seed: Path, out: Path) -> list[Path]:
    paths, buf = [], seed.read_bytes()
    head = pydicom.dcmread(seed, stop_before_pixels=True)

    def emit(name: str, data: bytes) -> None:
        path = out / f"{seed.stem}-{name}.dcm"
        path.write_bytes(data)
        paths.append(path)

    for field, element in US_FIELDS.items():
        for value in US_VALUES[field](int(getattr(head, field))):
            emit(f"{field}-{value}", _patch_us(buf, 0x0028, element, value % 65536))
    now = next((t for t in SYNTAXES if t in buf[:400]), None)
    for k, ts in enumerate(SYNTAXES if now else []):
        if ts != now:
            emit(f"syntax-{k}", buf.replace(now, ts, 1))
    for field, values in STRINGS.items():
        for k, value in enumerate(values):
            ds = pydicom.dcmread(seed)
            if value is None:
                if field in ds:
                    delattr(ds, field)
            else:
                setattr(ds, field, value)
            path = out / f"{seed.stem}-{field}-{k}.dcm"
            ds.save_as(path, enforce_file_format=False)
            paths.append(path)
    return paths


def reference(path: Path):
    """pydicom's pure-Python decode as (pixels, instance number), pixels "bright = high signal"
    (MONOCHROME1 mirrored over the stored bits: max - p unsigned, -1 - p signed), or None where it
    cannot decode the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path)
            pixels = np.asarray(ds.pixel_array).astype(np.int64)
            if ds.get("PhotometricInterpretation") == "MONOCHROME1":
                stored = int(ds.BitsStored)
                pixels = (-1 - pixels) if ds.PixelRepresentation == 1 else ((1 << stored) - 1 - pixels)
            inst = ds.get("InstanceNumber")
            return pixels, (-1 if inst is None or inst == "" else int(inst))
    except (Exception, BaseException) as e:  # pyo3 decoders (pylibjpeg-rle) panic with a BaseException
        if isinstance(e, KeyboardInterrupt):
            raise
        return None


def main(folder: str) -> int:
    from trainer.data.dicom import read_slice

    folder = Path(folder)
    out = folder / "mutants"
    out.mkdir(exist_ok=True)
    files = [p for seed in sorted((folder / "seed").glob("*.dcm")) for p in mutants(seed, out)]
    counts, bad = {"files": len(files), "skipped": 0, "equal": 0}, []
    equal_by_field: dict[str, int] = {}  # decoded exactly, per mutated field (`<seed>-<field>-<value>`)
    for path in files:
        try:
            read = read_slice(path)
        except Exception:
            counts["skipped"] += 1
            continue
        pixels = read.pixels
        got = reference(path)
        ref, inst = got if got is not None else (None, None)
        if (ref is not None and ref.shape == pixels.shape and np.array_equal(ref, pixels.astype(np.int64))
                and read.instance == inst):
            counts["equal"] += 1
            field = path.stem.split("-")[1]
            equal_by_field[field] = equal_by_field.get(field, 0) + 1
        else:
            bad.append(f"{path.name}: reader {pixels.shape} {pixels.dtype} instance {read.instance}, pydicom "
                       f"{None if ref is None else (ref.shape, str(ref.dtype))} instance {inst}")
    print(json.dumps(dict(counts, equal_by_field=equal_by_field, disagreements=bad)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
