"""Read one DICOM series with dicomsdl into a `Volume`: pixels plus per-slice geometry.

Slices are sorted by their position along the slice normal (the cross product of the two
ImageOrientationPatient vectors), never by file name or InstanceNumber, because instance order
can run against anatomy. A file that cannot be read is skipped with a warning naming it; the
series degrades by one slice instead of failing.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import dicomsdl
import numpy as np


class DicomWarning(UserWarning):
    """A DICOM file or series was skipped or degraded; the message names it."""


@dataclass
class Volume:
    """A series sorted along its normal. Images may differ in shape (lists, not one array)."""

    images: list[np.ndarray]  # uint8, one (rows, cols) array per slice, scaled per series
    positions: np.ndarray  # (S, 3) ImagePositionPatient, mm
    orientations: np.ndarray  # (S, 6) ImageOrientationPatient: row direction, column direction
    spacings: np.ndarray  # (S, 2) PixelSpacing: between rows, between columns (mm)
    instance_numbers: np.ndarray  # (S,)
    description: str = ""
    patient_position: str = ""
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file name, reason)

    def __len__(self) -> int:
        return len(self.images)

    def normals(self) -> np.ndarray:
        """(S, 3) unit slice normals (row direction x column direction), computed once: crops are
        cut on every sample, and they project points through the neighbouring slices."""
        if getattr(self, "_normals", None) is None or len(self._normals) != len(self.orientations):
            n = np.cross(self.orientations[:, :3], self.orientations[:, 3:])
            self._normals = np.array([v / np.linalg.norm(v) for v in n]).reshape(-1, 3)
        return self._normals

    def index_of_instance(self, instance_number: int) -> int | None:
        hits = np.flatnonzero(self.instance_numbers == instance_number)
        return int(hits[0]) if len(hits) else None

    # --- cache round trip (see cache.py) ---
    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {f"image_{i}": im for i, im in enumerate(self.images)}
        out.update(
            positions=self.positions,
            orientations=self.orientations,
            spacings=self.spacings,
            instance_numbers=self.instance_numbers,
            description=np.array(self.description),
            patient_position=np.array(self.patient_position),
            skipped=np.array(json.dumps(self.skipped)),
        )
        return out

    @classmethod
    def from_arrays(cls, arrays) -> "Volume":
        n = len(arrays["instance_numbers"])
        return cls(
            images=[np.asarray(arrays[f"image_{i}"]) for i in range(n)],
            positions=np.asarray(arrays["positions"]),
            orientations=np.asarray(arrays["orientations"]),
            spacings=np.asarray(arrays["spacings"]),
            instance_numbers=np.asarray(arrays["instance_numbers"]),
            description=str(arrays["description"]),
            patient_position=str(arrays["patient_position"]),
            skipped=[tuple(x) for x in json.loads(str(arrays["skipped"]))],
        )


_PIXEL_TAGS = (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")  # (7FE0,0010) little / big endian
_SEQ_END = (b"\xfe\xff\xdd\xe0\x00\x00\x00\x00", b"\xff\xfe\xe0\xdd\x00\x00\x00\x00")
_TRAILING_PADDING = (b"\xfc\xff\xfc\xff", b"\xff\xfc\xff\xfc")


def structurally_intact(buf: bytes) -> bool:
    """True when a file has the DICM preamble and a PixelData element that ends exactly at the end
    of the file (or before trailing padding). dicomsdl crashes the interpreter on truncated files
    (a segmentation fault, not an exception), so only files that pass this go to it."""
    if len(buf) < 132 or buf[128:132] != b"DICM":
        return False
    n = len(buf)
    for big, tag in enumerate(_PIXEL_TAGS):
        order = "big" if big else "little"
        i = buf.find(tag, 132)
        while i != -1:
            if buf[i + 4:i + 6] in (b"OW", b"OB"):  # explicit VR: 2 reserved bytes, 4-byte length
                length, start = int.from_bytes(buf[i + 8:i + 12], order), i + 12
            else:  # implicit VR: 4-byte length
                length, start = int.from_bytes(buf[i + 4:i + 8], order), i + 8
            if length == 0xFFFFFFFF:  # encapsulated (compressed) frames end with a delimiter
                if buf.rstrip(b"\0")[-8:] in _SEQ_END or buf[-8:] in _SEQ_END:
                    return True
            elif start + length == n or (start + length < n and buf[start + length:start + length + 4] in _TRAILING_PADDING):
                return True
            i = buf.find(tag, i + 4)
    return False


def read_slice(path: Path):
    buf = path.read_bytes()
    if structurally_intact(buf):
        ds = dicomsdl.open_memory(buf)
        ipp, iop, ps, inst, desc, pos, bits, samples, slope, intercept = ds.getValues(
            ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "InstanceNumber",
             "SeriesDescription", "PatientPosition", "BitsAllocated", "SamplesPerPixel", "RescaleSlope",
             "RescaleIntercept"])
        # dicomsdl aborts the interpreter on some layouts (32-bit RGB RLE seen): MR is one 8/16-bit
        # channel, so anything else is refused before decoding
        if bits not in (8, 16) or samples not in (1, None):
            raise ValueError(f"unsupported pixel format: {samples} samples of {bits} bits (expected 1 of 8/16)")
        # stored integers when there is no rescale (MR, nearly always): the same values as
        # dicomsdl's float32 copy, at a quarter of the memory traffic; scale_to_uint8 then uses a table
        plain = slope in (None, 1, 1.0) and intercept in (None, 0, 0.0)
        pixels = ds.pixelData(storedvalue=True) if plain else ds.pixelData()
    else:  # odd or broken file: pydicom raises clean exceptions where dicomsdl would crash
        import pydicom

        ds = pydicom.dcmread(path)
        get = lambda k: ds.get(k)
        ipp, iop, ps, inst, desc, pos = (get(k) for k in (
            "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "InstanceNumber",
            "SeriesDescription", "PatientPosition"))
        pixels = ds.pixel_array
    for name, value, size in (("ImagePositionPatient", ipp, 3), ("ImageOrientationPatient", iop, 6),
                              ("PixelSpacing", ps, 2)):
        if value is None or len(value) != size:
            raise ValueError(f"tag {name} missing or malformed ({value!r})")
    if pixels is None or pixels.ndim != 2:
        raise ValueError(f"pixel data of shape {getattr(pixels, 'shape', None)} is not one 2-D frame")
    return (pixels, [float(v) for v in ipp], [float(v) for v in iop], [float(v) for v in ps],
            int(inst if inst is not None else -1), str(desc or ""), str(pos or ""))


def scale_to_uint8(images: list[np.ndarray]) -> list[np.ndarray]:
    """One intensity window for the whole series (0.5-99.5 percentile), so slices stay comparable.
    Unsigned 8/16-bit slices go through a lookup table computed exactly as the float path would."""
    sample = np.concatenate([im.ravel()[:: max(1, im.size // 4096)].astype(np.float32, copy=False)
                             for im in images])
    lo, hi = np.percentile(sample, [0.5, 99.5])
    scale = 255.0 / max(hi - lo, 1e-6)
    if all(im.dtype in (np.uint8, np.uint16) for im in images):
        levels = np.arange(256 if all(im.dtype == np.uint8 for im in images) else 65536, dtype=np.float32)
        table = np.clip((levels - lo) * scale, 0, 255).astype(np.uint8)
        return [table[im] for im in images]
    return [np.clip((np.asarray(im, dtype=np.float32) - lo) * scale, 0, 255).astype(np.uint8) for im in images]


def read_series(series_dir: Path) -> Volume:
    """Decode every ``*.dcm`` of a series folder. Raises FileNotFoundError when none is readable."""
    series_dir = Path(series_dir)
    if not series_dir.is_dir():
        raise FileNotFoundError(f"{series_dir}: series folder not found")
    files = sorted(series_dir.glob("*.dcm"))
    rows, skipped = [], []
    for f in files:
        try:
            rows.append(read_slice(f))
        except Exception as e:  # dicomsdl raises RuntimeError/DicomException on broken files
            reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            skipped.append((f.name, reason))
            warnings.warn(f"{f}: unreadable DICOM slice skipped ({reason})", DicomWarning, stacklevel=2)
    if not rows:
        raise FileNotFoundError(f"{series_dir}: no readable DICOM file among {len(files)}")
    pixels, ipp, iop, ps, inst, desc, ppos = zip(*rows)
    positions = np.asarray(ipp, dtype=np.float64)
    orientations = np.asarray(iop, dtype=np.float64)
    normal = np.cross(orientations[0, :3], orientations[0, 3:])
    order = np.argsort(positions @ normal, kind="stable")
    images = scale_to_uint8([pixels[i] for i in order])
    return Volume(
        images=images,
        positions=positions[order],
        orientations=orientations[order],
        spacings=np.asarray(ps, dtype=np.float64)[order],
        instance_numbers=np.asarray(inst, dtype=np.int64)[order],
        description=str(desc[0]),
        patient_position=str(ppos[0]),
        skipped=skipped,
    )
