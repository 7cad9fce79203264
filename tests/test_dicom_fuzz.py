"""No header value can crash the DICOM reader or make it read past the pixel data."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from pydicom.data import get_testdata_file

from helpers import write_sagittal

ROOT = Path(__file__).resolve().parent.parent


def test_mutated_headers_are_decoded_exactly_or_skipped(tmp_path):
    seed = tmp_path / "seed"
    # the phantom's own writer: 16-bit native and RLE files, two sizes
    write_sagittal(seed / "a", [0.0, 3.0], [1, 2], size=48, dots=[(5, 6), (7, 8)], rle_every=2)
    write_sagittal(seed / "b", [0.0, 3.0], [1, 2], size=40, dots=[(5, 6), (7, 8)], rle_every=2)
    for sub in ("a", "b"):
        for f in (seed / sub).iterdir():
            f.rename(seed / f"{sub}{f.name}")
    for name in ("MR_small.dcm", "MR_small_RLE.dcm", "MR_small_implicit.dcm"):  # pydicom's: signed, implicit VR
        shutil.copy(get_testdata_file(name), seed / name)
    # in a subprocess: a native decoder that crashes shows as an exit code, not as a dead pytest
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "dicom_fuzz.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["disagreements"] == []
    assert out["files"] >= 300 and out["skipped"] + out["equal"] == out["files"]
    assert out["equal"] >= 50  # the harmless mutations still decode (e.g. a signed PixelRepresentation)
    # MONOCHROME1 decodes, mirrored to "bright = high signal" (native, RLE, signed, implicit VR seeds);
    # every InstanceNumber pydicom reads (0, negative, 5046, deleted: -1) is read the same
    assert out["equal_by_field"]["PhotometricInterpretation"] >= 2 * 7
    assert out["equal_by_field"]["InstanceNumber"] >= 4 * 7
