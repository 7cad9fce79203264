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
from typing import NamedTuple

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
    files: list[str] = field(default_factory=list)  # (S,) each slice's file name

    def __len__(self) -> int:
        return len(self.images)

    def normals(self) -> np.ndarray:
        """(S, 3) unit slice normals (row direction x column direction), computed once: crops are
        cut on every sample, and they project points through the neighbouring slices."""
        if getattr(self, "_normals", None) is None or len(self._normals) != len(self.orientations):
            n = np.cross(self.orientations[:, :3], self.orientations[:, 3:])
            self._normals = np.array([v / np.linalg.norm(v) for v in n]).reshape(-1, 3)
        return self._normals

    def slices_of_instance(self, instance_number: int) -> list[int]:
        """Every slice index holding `instance_number` (sorted order): one for a sound series."""
        return [int(i) for i in np.flatnonzero(self.instance_numbers == instance_number)]

    def index_of_instance(self, instance_number: int) -> int | None:
        """The slice index of an instance number, or None unless exactly one slice holds it: a
        repeated number cannot say which slice a label meant (`slices_of_instance` tells them
        apart from a missing one)."""
        hits = self.slices_of_instance(instance_number)
        return hits[0] if len(hits) == 1 else None

    def repeated_instances(self) -> dict[int, list[str]]:
        """Instance numbers that more than one slice holds, with those slices' file names (-1:
        files without an InstanceNumber)."""
        numbers, counts = np.unique(self.instance_numbers, return_counts=True)
        return {int(n): [self.file_name(i) for i in self.slices_of_instance(int(n))]
                for n, c in zip(numbers, counts) if c > 1}

    def file_name(self, index: int) -> str:
        """The file name of slice `index` (sorted order), or ``"slice <index>"`` when the volume holds
        no file names."""
        return self.files[index] if index < len(self.files) else f"slice {index}"

    # --- cache round trip (see cache.py) ---
    def to_arrays(self) -> dict[str, np.ndarray]:
        """The volume as named arrays for ``np.savez``: ``image_<i>`` per slice, the geometry arrays,
        and the strings and lists as 0-d arrays (lists JSON-encoded). `from_arrays` reads them back."""
        out = {f"image_{i}": im for i, im in enumerate(self.images)}
        out.update(
            positions=self.positions,
            orientations=self.orientations,
            spacings=self.spacings,
            instance_numbers=self.instance_numbers,
            description=np.array(self.description),
            patient_position=np.array(self.patient_position),
            skipped=np.array(json.dumps(self.skipped)),
            files=np.array(json.dumps(self.files)),
        )
        return out

    @classmethod
    def from_arrays(cls, arrays) -> "Volume":
        """The Volume of `to_arrays`'s named arrays (any mapping holding those names); without ``files``
        it holds no file names."""
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
            files=json.loads(str(arrays["files"])) if "files" in arrays else [],
        )


_PIXEL_TAGS = (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")  # (7FE0,0010) little / big endian
_SEQ_END = (b"\xfe\xff\xdd\xe0\x00\x00\x00\x00", b"\xff\xfe\xe0\xdd\x00\x00\x00\x00")
_TRAILING_PADDING = (b"\xfc\xff\xfc\xff", b"\xff\xfc\xff\xfc")
_ITEM = b"\xfe\xff\x00\xe0"  # (FFFE,E000), little endian: encapsulated fragments
UNDEFINED = 0xFFFFFFFF

# transfer syntaxes dicomsdl decodes here; any other goes to pydicom, which raises clean errors
NATIVE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}  # implicit / explicit VR little endian
RLE = "1.2.840.10008.1.2.5"
JPEG = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"}  # baseline, extended, lossless (x2), JPEG-LS (x2)
JPEG2000 = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"}
MAX_SIDE = 8192  # MR matrices are 64-1024 px; a larger header value is damage, not an image


def pixel_span(buf: bytes) -> tuple[int, int] | None:
    """(start, length) of the PixelData value when a file has the DICM preamble and a PixelData
    element that ends exactly at the end of the file (or before trailing padding); length is
    UNDEFINED for encapsulated (compressed) data. None otherwise: dicomsdl crashes the interpreter
    on truncated files (a segmentation fault, not an exception), so only files that pass go to it."""
    if len(buf) < 132 or buf[128:132] != b"DICM":
        return None
    n = len(buf)
    for big, tag in enumerate(_PIXEL_TAGS):
        order = "big" if big else "little"
        i = buf.find(tag, 132)
        while i != -1:
            if buf[i + 4:i + 6] in (b"OW", b"OB"):  # explicit VR: 2 reserved bytes, 4-byte length
                length, start = int.from_bytes(buf[i + 8:i + 12], order), i + 12
            else:  # implicit VR: 4-byte length
                length, start = int.from_bytes(buf[i + 4:i + 8], order), i + 8
            if length == UNDEFINED:  # encapsulated (compressed) frames end with a delimiter
                if buf[-8:] in _SEQ_END or buf[-4096:].rstrip(b"\0")[-8:] in _SEQ_END:
                    return start, length
            elif start + length == n or (start + length < n and buf[start + length:start + length + 4] in _TRAILING_PADDING):
                return start, length
            i = buf.find(tag, i + 4)
    return None


def _fragments(buf: bytes, start: int) -> list[memoryview]:
    """The fragments of encapsulated pixel data, the Basic Offset Table first."""
    out, i, view = [], start, memoryview(buf)
    while buf[i:i + 4] == _ITEM:
        length = int.from_bytes(buf[i + 4:i + 8], "little")
        if length == UNDEFINED or i + 8 + length > len(buf):
            raise ValueError(f"encapsulated fragment at byte {i} runs past the end of the file")
        out.append(view[i + 8:i + 8 + length])
        i += 8 + length
    return out


def decode_rle(frame: memoryview, rows: int, cols: int, bits: int, signed: bool) -> np.ndarray:
    """One RLE Lossless frame (DICOM PS3.5 annex G) to a (rows, cols) array. Each segment (one
    byte plane, most significant first) is decoded by pylibjpeg-rle's bounds-checked decoder and
    must come out exactly Rows x Columns bytes long; native decoders trust Rows and Columns and
    read or write past their buffers when the header lies."""
    from rle.utils import decode_segment

    if len(frame) < 64:
        raise ValueError(f"RLE frame of {len(frame)} bytes has no 64-byte header")
    header = np.frombuffer(frame[:64], dtype="<u4")
    n, planes = int(header[0]), bits // 8
    if n != planes:
        raise ValueError(f"RLE frame has {n} segments, BitsAllocated {bits} needs {planes}")
    offsets = [int(o) for o in header[1:1 + n]]
    out = np.empty((rows * cols, planes), dtype=np.uint8)
    for k, (a, b) in enumerate(zip(offsets, offsets[1:] + [len(frame)])):
        if not 64 <= a <= b <= len(frame):
            raise ValueError(f"RLE segment {k} at bytes {a}..{b} lies outside the frame's {len(frame)}")
        try:
            plane = decode_segment(bytes(frame[a:b]))
        except Exception:
            raise
        except BaseException as e:  # the Rust decoder panics on some damaged segments
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            raise ValueError(f"RLE segment {k} cannot be decoded") from None
        if len(plane) not in (rows * cols, rows * cols + 1):  # + 1: the segment's even-length padding
            raise ValueError(f"RLE segment {k} decodes to {len(plane)} bytes, "
                             f"Rows x Columns = {rows} x {cols} needs {rows * cols}")
        out[:, planes - 1 - k] = np.frombuffer(plane, dtype=np.uint8, count=rows * cols)
    kind = ("<i" if signed else "<u") + str(planes)
    return out.view(kind).reshape(rows, cols)


def _marker_size(frame: memoryview, ts: str) -> tuple[int, int] | None:
    """(rows, columns) from a compressed frame's own header: JPEG's SOF, JPEG 2000's SIZ."""
    data = bytes(frame[:65536])
    if ts in JPEG2000:
        i = data.find(b"\xff\x51")  # SIZ
        if i < 0 or i + 24 > len(data):
            return None
        x, y, x0, y0 = (int.from_bytes(data[i + o:i + o + 4], "big") for o in (6, 10, 14, 18))
        return y - y0, x - x0
    i = 2
    while i + 9 < len(data):  # walk the JPEG markers to the frame header
        if data[i] != 0xFF:
            return None
        m = data[i + 1]
        if m in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7):
            return int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def pixel_mismatch(buf: bytes, span: tuple[int, int], ts: str, rows, cols, bits, samples, frames) -> str | None:
    """Why the header's image geometry disagrees with the pixel bytes, or None when it agrees.
    Native decoders trust Rows, Columns, BitsAllocated and NumberOfFrames: a wrong value makes
    them read past the pixel buffer or crash the interpreter, so nothing reaches them unchecked."""
    for name, v in (("Rows", rows), ("Columns", cols)):
        if not isinstance(v, int) or not 1 <= v <= MAX_SIDE:
            return f"{name} {v!r} is not an image side (1-{MAX_SIDE})"
    if bits not in (8, 16) or samples not in (1, None):  # dicomsdl aborts on some others (32-bit RGB RLE seen)
        return f"unsupported pixel format: {samples} samples of {bits} bits (expected 1 of 8/16)"
    if frames not in (None, 1, "1"):
        return f"NumberOfFrames {frames!r}: one frame per slice expected"
    start, length = span
    if ts in NATIVE:
        need = rows * cols * bits // 8
        if length not in (need, need + need % 2):
            return f"PixelData holds {length} bytes, Rows x Columns x BitsAllocated = {rows} x {cols} x {bits} needs {need}"
        return None
    if length != UNDEFINED:
        return f"transfer syntax {ts} is compressed but PixelData is not encapsulated"
    frags = _fragments(buf, start)
    if len(frags) < 2:
        return "encapsulated PixelData has no frame"
    if ts == RLE:  # checked while decoding (decode_rle)
        return None if len(frags) == 2 else f"RLE PixelData has {len(frags) - 1} fragments for one frame"
    size = _marker_size(frags[1], ts)
    if size is None:
        return f"no frame header found in the compressed data ({ts})"
    if size != (rows, cols):
        return f"the compressed frame is {size[0]} x {size[1]}, Rows x Columns say {rows} x {cols}"
    return None


def value_mismatch(bits, stored, signed, photometric) -> str | None:
    """Why the header's pixel value fields cannot describe one grey MR image, or None."""
    if not isinstance(stored, int) or not 1 <= stored <= bits:
        return f"BitsStored {stored!r} with BitsAllocated {bits}"
    if signed not in (0, 1, None):
        return f"PixelRepresentation {signed!r} (0 unsigned or 1 signed)"
    if photometric not in ("MONOCHROME1", "MONOCHROME2", None):
        return f"PhotometricInterpretation {photometric!r}: one grey channel expected (MONOCHROME1/2)"
    return None


def _only_stored_bits(pixels: np.ndarray, stored: int, signed: bool) -> np.ndarray:
    """Keep the low `stored` bits (sign-extended when signed), as the standard and pydicom do."""
    width = pixels.dtype.itemsize * 8
    if signed:
        shift = width - stored
        return (pixels.astype(pixels.dtype.newbyteorder("=")) << shift) >> shift
    return np.bitwise_and(pixels, np.array((1 << stored) - 1, dtype=pixels.dtype), out=pixels)  # in place


def bright_is_high(pixels: np.ndarray, photometric, stored: int, signed: bool, slope=None,
                   intercept=None) -> np.ndarray:
    """Pixels in "bright = high signal" form, whatever the header's PhotometricInterpretation
    (MONOCHROME2 or none: as stored; MONOCHROME1: the lowest value displays white, so the values
    are mirrored over the stored bit range: ``2**BitsStored - 1 - p`` unsigned, ``-1 - p``
    signed, the same mirror in rescaled units when `slope`/`intercept` were applied). A scanner
    or anonymiser that writes MONOCHROME1 would otherwise give every crop inverted contrast.
    Raises ValueError for an interpretation that is not one grey channel."""
    kind = str(photometric).strip().upper() if photometric is not None else "MONOCHROME2"
    if kind == "MONOCHROME2":
        return pixels
    if kind != "MONOCHROME1":
        raise ValueError(f"PhotometricInterpretation {photometric!r}: one grey channel expected (MONOCHROME1/2)")
    lo, hi = (-(1 << (stored - 1)), (1 << (stored - 1)) - 1) if signed else (0, (1 << stored) - 1)
    if slope not in (None, 1, 1.0) or intercept not in (None, 0, 0.0) or pixels.dtype.kind == "f":
        a, b = float(slope if slope is not None else 1), float(intercept or 0)
        return (np.float32(lo * a + b + hi * a + b) - pixels.astype(np.float32)).astype(np.float32)
    if signed:  # -1 - p stays inside the signed range of the stored bits (no overflow)
        return (np.array(-1, dtype=pixels.dtype) - pixels).astype(pixels.dtype)
    return (np.array(hi, dtype=pixels.dtype) - pixels).astype(pixels.dtype)


def read_slice(path: Path):
    """Pixels and geometry of one file, or an exception naming what is wrong with it."""
    buf = path.read_bytes()
    span = pixel_span(buf)
    ds = dicomsdl.open_memory(buf) if span is not None else None
    ts = ds.getValues(["TransferSyntaxUID"])[0] if ds is not None else None
    if ds is not None and (ts in NATIVE or ts == RLE or ts in JPEG or ts in JPEG2000):
        (ipp, iop, ps, inst, desc, pos, bits, samples, slope, intercept, rows, cols, frames,
         series_uid, stored, signed, photometric) = ds.getValues(
            ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "InstanceNumber",
             "SeriesDescription", "PatientPosition", "BitsAllocated", "SamplesPerPixel", "RescaleSlope",
             "RescaleIntercept", "Rows", "Columns", "NumberOfFrames", "SeriesInstanceUID", "BitsStored",
             "PixelRepresentation", "PhotometricInterpretation"])
        reason = (pixel_mismatch(buf, span, ts, rows, cols, bits, samples, frames)
                  or value_mismatch(bits, stored, signed, photometric))
        if reason:
            raise ValueError(reason)
        # stored integers when there is no rescale (MR, nearly always): the same values as
        # dicomsdl's float32 copy, at a quarter of the memory traffic; scale_to_uint8 then uses a table
        plain = slope in (None, 1, 1.0) and intercept in (None, 0, 0.0)
        if ts == RLE:
            pixels = decode_rle(_fragments(buf, span[0])[1], rows, cols, bits, bool(signed))
            if not plain:
                pixels = pixels.astype(np.float32) * np.float32(slope or 1) + np.float32(intercept or 0)
        else:
            pixels = ds.pixelData(storedvalue=True) if plain else ds.pixelData()
        if pixels is not None and pixels.shape != (rows, cols):
            raise ValueError(f"decoded {pixels.shape}, Rows x Columns say {rows} x {cols}")
        if plain and stored < bits:  # bits above HighBit are not the pixel's (overlays, noise)
            pixels = _only_stored_bits(pixels, stored, bool(signed))
        if pixels is not None:
            pixels = bright_is_high(pixels, photometric, stored, bool(signed), *(() if plain else (slope, intercept)))
    else:  # odd or broken file: pydicom raises clean exceptions where dicomsdl would crash
        import pydicom

        ds = pydicom.dcmread(path)
        get = lambda k: ds.get(k)
        ipp, iop, ps, inst, desc, pos, series_uid = (get(k) for k in (
            "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "InstanceNumber",
            "SeriesDescription", "PatientPosition", "SeriesInstanceUID"))
        rows, cols = get("Rows"), get("Columns")
        for name, v in (("Rows", rows), ("Columns", cols)):
            if not isinstance(v, int) or not 1 <= v <= MAX_SIDE:
                raise ValueError(f"{name} {v!r} is not an image side (1-{MAX_SIDE})")
        bits, stored, signed, photometric = (get(k) for k in (
            "BitsAllocated", "BitsStored", "PixelRepresentation", "PhotometricInterpretation"))
        reason = value_mismatch(bits, stored, signed, photometric)
        if reason:
            raise ValueError(reason)
        try:
            pixels = ds.pixel_array
        except Exception:
            raise
        except BaseException as e:  # a Rust decoder plugin (pylibjpeg-rle) panics on damaged data
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            raise ValueError(f"pixel data cannot be decoded ({type(e).__name__}: {str(e)[:120]})") from None
        if getattr(pixels, "ndim", 0) == 2:  # pydicom gives stored values: the same mirror as above
            pixels = bright_is_high(pixels, photometric, stored, bool(signed))
    for name, value, size in (("ImagePositionPatient", ipp, 3), ("ImageOrientationPatient", iop, 6),
                              ("PixelSpacing", ps, 2)):
        if value is None or len(value) != size:
            raise ValueError(f"tag {name} missing or malformed ({value!r})")
    if pixels is None or pixels.ndim != 2:
        raise ValueError(f"pixel data of shape {getattr(pixels, 'shape', None)} is not one 2-D frame")
    iop = [float(v) for v in iop]
    a, b = iop[:3], iop[3:]  # plain arithmetic: numpy's cross costs more than the decode on small files
    n2 = ((a[1] * b[2] - a[2] * b[1]) ** 2 + (a[2] * b[0] - a[0] * b[2]) ** 2 + (a[0] * b[1] - a[1] * b[0]) ** 2)
    if not n2 > 0.25:  # also false for NaN
        raise ValueError(f"ImageOrientationPatient {iop} is not two orthogonal unit vectors")
    return Slice(pixels, [float(v) for v in ipp], iop, [float(v) for v in ps],
                 int(inst if inst is not None else -1), str(desc or ""), str(pos or ""), str(series_uid or ""))


class Slice(NamedTuple):
    """One decoded DICOM file (`read_slice`).

    `pixels` is one ``[rows, cols]`` frame in bright-is-high form (`bright_is_high`), not yet scaled
    to uint8: the stored values, or float32 when a RescaleSlope/RescaleIntercept was applied.
    `position` is ImagePositionPatient (x, y, z) in mm, `orientation` ImageOrientationPatient's six
    direction cosines (row direction, then column direction), `spacing` PixelSpacing (between rows,
    between columns) in mm, `instance` InstanceNumber (-1 when absent); the strings are "" when absent."""

    pixels: np.ndarray
    position: list[float]
    orientation: list[float]
    spacing: list[float]
    instance: int
    description: str
    patient_position: str
    series_uid: str


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


PLANES = ("sagittal", "coronal", "axial")  # the patient axis (x, y, z) a slice's normal runs closest to


def plane(orientation) -> str:
    """The anatomical plane of a slice from its ImageOrientationPatient (six direction cosines):
    ``"sagittal"``, ``"coronal"`` or ``"axial"``, after the patient axis (x, y or z) its normal runs closest to."""
    o = np.asarray(orientation, dtype=np.float64)
    return PLANES[int(np.argmax(np.abs(np.cross(o[:3], o[3:]))))]


def _one_series(rows: list[tuple[Path, Slice]], skip) -> list[tuple[Path, Slice]]:
    """Drop the slices that do not belong with the rest of their folder: another SeriesInstanceUID
    than most of its slices, or another anatomical plane (a sagittal slice in an axial series).
    Slices of one plane at different angles or of different sizes stay: one axial series can hold
    several stacks, tilted with their discs, and its images can differ in shape (DOMAIN.md)."""
    for label, key in (("series", lambda r: r.series_uid), ("plane", lambda r: plane(r.orientation))):
        if len(rows) < 2:
            return rows
        counts: dict = {}
        for _, r in rows:
            counts[key(r)] = counts.get(key(r), 0) + 1
        top = max(counts.values())
        winners = [k for k, c in counts.items() if c == top]
        if len(winners) > 1:  # no majority: keep the series as it is rather than guess
            continue
        kept = []
        for f, r in rows:
            if key(r) == winners[0]:
                kept.append((f, r))
            else:
                what = (f"SeriesInstanceUID {r.series_uid} while {top} of {len(rows)} slices are {winners[0]}"
                        if label == "series" else
                        f"{key(r)} slice among {top} {winners[0]} slices of {len(rows)}")
                skip(f, what, "slice of another series")
        rows = kept
    return rows


def read_series(series_dir: Path) -> Volume:
    """Decode every ``*.dcm`` of a series folder. Raises FileNotFoundError when none is readable."""
    series_dir = Path(series_dir)
    if not series_dir.is_dir():
        raise FileNotFoundError(f"{series_dir}: series folder not found")
    files = sorted(series_dir.glob("*.dcm"))
    rows, skipped = [], []

    def skip(f: Path, reason: str, what: str = "unreadable DICOM slice") -> None:
        skipped.append((f.name, reason))
        warnings.warn(f"{f}: {what} skipped ({reason})", DicomWarning, stacklevel=3)

    for f in files:
        try:
            rows.append((f, read_slice(f)))
        except Exception as e:  # dicomsdl raises RuntimeError/DicomException on broken files
            skip(f, str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__)
    rows = _one_series(rows, skip)
    if not rows:
        raise FileNotFoundError(f"{series_dir}: no readable DICOM file among {len(files)}")
    names = [f.name for f, _ in rows]
    pixels, ipp, iop, ps, inst, desc, ppos, _ = zip(*(r for _, r in rows))
    positions = np.asarray(ipp, dtype=np.float64)
    orientations = np.asarray(iop, dtype=np.float64)
    normal = np.cross(orientations[0, :3], orientations[0, 3:])  # every slice shares its plane now
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
        files=[names[i] for i in order],
    )
