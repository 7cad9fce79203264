import shutil
import warnings

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from trainer.data.dicom import DicomWarning, read_series
from trainer.data.geometry import (nearest_slice, patient_to_pixel, pixel_to_patient, sagittal_side,
                                   slice_normal)
from trainer.data.phantom import SeriesPlan, write_series

from helpers import AXIAL, dot_images, series_plan, write_sagittal


def test_sorted_by_position_not_by_instance_number(tmp_path):
    # instance numbers run against anatomy and jump (24 -> 5031)
    xs = [-6.0, -3.0, 0.0, 3.0, 6.0]
    write_sagittal(tmp_path, xs, instances=[5033, 5031, 24, 23, 22])
    vol = read_series(tmp_path)
    proj = vol.positions @ slice_normal(vol)
    assert np.all(np.diff(proj) > 0)
    # the sagittal normal is -x, so sorted along it the x positions fall
    assert list(vol.positions[:, 0]) == sorted(xs, reverse=True)
    assert list(vol.instance_numbers) == [22, 23, 24, 5031, 5033]
    assert vol.index_of_instance(24) == 2 and vol.index_of_instance(7) is None


def test_pixel_patient_round_trip_and_known_position(tmp_path):
    write_sagittal(tmp_path, [0.0, 3.0], instances=[1, 2], spacing=0.5)
    vol = read_series(tmp_path)
    i = vol.index_of_instance(1)
    p = pixel_to_patient(vol, i, 10, 20)
    # row direction +y, column direction -z, spacing 0.5
    np.testing.assert_allclose(p, [0.0, -16.0 + 5.0, 16.0 - 10.0])
    x, y, d = patient_to_pixel(vol, i, p)
    assert (x, y) == pytest.approx((10, 20)) and d == pytest.approx(0)


def test_missing_thickness_and_mixed_shapes_are_tolerated(tmp_path):
    plan = series_plan(AXIAL, [(-16, -16, z) for z in (0.0, 3.0, 6.0)])
    images = dot_images(3)
    images[1] = np.full((48, 80), 7, dtype=np.uint16)  # a slice of another shape in the same series
    write_series(tmp_path, images, plan, [1, 2, 3], 1, 2, with_thickness=False)
    vol = read_series(tmp_path)
    assert [im.shape for im in vol.images] == [(64, 64), (48, 80), (64, 64)]


def test_truncated_file_is_skipped_with_a_warning_naming_it(tmp_path):
    write_sagittal(tmp_path, [0.0, 3.0, 6.0], instances=[1, 2, 3])
    shutil.copy(get_testdata_file("MR_truncated.dcm"), tmp_path / "4.dcm")
    (tmp_path / "5.dcm").write_bytes(b"not a dicom file")
    with pytest.warns(DicomWarning, match=r"4\.dcm: unreadable DICOM slice skipped"):
        vol = read_series(tmp_path)
    assert len(vol) == 3
    assert {name for name, _ in vol.skipped} == {"4.dcm", "5.dcm"}


def test_rle_compressed_files_decode_like_raw_ones(tmp_path):
    raw, rle = tmp_path / "raw", tmp_path / "rle"
    write_sagittal(raw, [0.0, 3.0, 6.0], [1, 2, 3], dots=[(5, 6), (7, 8), (9, 10)])
    write_sagittal(rle, [0.0, 3.0, 6.0], [1, 2, 3], dots=[(5, 6), (7, 8), (9, 10)], rle_every=1)
    import pydicom

    assert pydicom.dcmread(rle / "1.dcm").file_meta.TransferSyntaxUID.name == "RLE Lossless"
    for a, b in zip(read_series(raw).images, read_series(rle).images):
        np.testing.assert_array_equal(a, b)


def test_no_readable_file_raises(tmp_path):
    (tmp_path / "1.dcm").write_bytes(b"junk")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(FileNotFoundError, match="no readable DICOM"):
            read_series(tmp_path)
    with pytest.raises(FileNotFoundError, match="series folder not found"):
        read_series(tmp_path / "missing")


def test_sagittal_side_follows_patient_x_not_index(tmp_path):
    write_sagittal(tmp_path, [-9.0, 0.0, 9.0], [1, 2, 3])
    vol = read_series(tmp_path)
    sides = {float(vol.positions[i, 0]): sagittal_side(vol, i, midline_x=0.0) for i in range(3)}
    assert sides[9.0] == "left" and sides[-9.0] == "right"  # +x is the patient's left


def test_nearest_axial_slice_of_a_sagittal_point(tmp_path):
    sag, ax = tmp_path / "sag", tmp_path / "ax"
    write_sagittal(sag, [0.0], [1], spacing=0.5)
    # axial stack at z = 0, 4, 8 with the FFS mirror (row direction -x)
    ffs = np.array([-1, 0, 0, 0, 1, 0], dtype=float)
    plan = SeriesPlan("Axial T2", "T2", np.array([(16, -16, z) for z in (0.0, 4.0, 8.0)]),
                      np.tile(ffs, (3, 1)), 0.5, 64, 3, 4, "FFS")
    write_series(ax, dot_images(3), plan, [3, 2, 1], 1, 3)
    vs, va = read_series(sag), read_series(ax)
    p = pixel_to_patient(vs, 0, 32, 24)  # (0, 0, 4)
    idx, x, y, dist = nearest_slice(va, p)
    assert va.positions[idx, 2] == pytest.approx(4.0) and dist == pytest.approx(0.0)
    assert (x, y) == pytest.approx((32, 32))
    # FFS: patient-left (+x) lands at a smaller image column than patient-right
    xl, _, _ = patient_to_pixel(va, idx, p + [5, 0, 0])
    xr, _, _ = patient_to_pixel(va, idx, p - [5, 0, 0])
    assert xl < xr


def test_phantom_left_points_lie_on_the_patients_left(layout):
    """The phantom's left foramen and left recess points sit at larger patient x, whichever the
    stack order or FFS mirroring of their series."""

    c = layout.coordinates
    n_checked = 0
    for sid in layout.study_ids:
        rows = c[c.study_id == sid]
        for prefix in ("neural_foraminal_narrowing", "subarticular_stenosis"):
            for level in ("l2_l3", "l4_l5"):
                pts = {}
                for side in ("left", "right"):
                    r = rows[(rows.condition == f"{side}_{prefix}") & (rows.level == level)]
                    if len(r):
                        r = r.iloc[0]
                        vol = read_series(layout.series_dir(sid, r.series_id))
                        i = vol.index_of_instance(r.instance_number)
                        pts[side] = pixel_to_patient(vol, i, r.x, r.y)[0]
                if len(pts) == 2:
                    assert pts["left"] > pts["right"]
                    n_checked += 1
    assert n_checked >= 20


@pytest.mark.parametrize("name", ["MR_truncated.dcm", "SC_rgb_rle_32bit.dcm", "rtplan.dcm", "no_meta.dcm",
                                  "MR_small_RLE.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm"])
def test_pydicom_test_files_never_crash_the_reader(tmp_path, name):
    """dicomsdl segfaults or aborts on some of these; the reader must only skip or decode them."""
    from trainer.data.dicom import read_slice
    from pathlib import Path

    path = Path(get_testdata_file(name))
    try:
        pixels, *_ = read_slice(path)
    except Exception as e:
        assert name in ("MR_truncated.dcm", "SC_rgb_rle_32bit.dcm", "rtplan.dcm", "no_meta.dcm"), e
    else:
        assert pixels.shape == (64, 64)


def _patch_rows(path, value):
    buf = path.read_bytes()
    i = buf.index(b"\x28\x00\x10\x00US\x02\x00", 132)
    path.write_bytes(buf[:i + 8] + value.to_bytes(2, "little") + buf[i + 10:])


@pytest.mark.parametrize("rle_every", [0, 1])
@pytest.mark.parametrize("rows", [0, 63, 65, 200, 4096, 65535])
def test_a_header_that_disagrees_with_the_pixel_bytes_skips_the_slice(tmp_path, rows, rle_every):
    """Rows 65535 used to crash the interpreter in the native decoder; 200 or 4096 read past the
    pixel buffer silently. The header is now checked against the bytes before any decoder."""
    write_sagittal(tmp_path, [0.0, 3.0, 6.0], instances=[1, 2, 3], rle_every=rle_every)
    _patch_rows(tmp_path / "2.dcm", rows)
    with pytest.warns(DicomWarning, match=r"2\.dcm: unreadable DICOM slice skipped \(.*(Rows|RLE segment)"):
        vol = read_series(tmp_path)
    assert sorted(vol.instance_numbers) == [1, 3] and [n for n, _ in vol.skipped] == ["2.dcm"]


def test_a_slice_of_another_series_or_plane_is_skipped_with_a_warning(tmp_path):
    write_sagittal(tmp_path / "s", [0.0, 3.0, 6.0, 9.0], instances=[1, 2, 3, 4])
    # a readable 32 px axial slice with the same SeriesInstanceUID (same study and series ids)
    write_series(tmp_path / "axial", dot_images(1, size=32), series_plan(AXIAL, [(-8, -8, 0.0)], size=32),
                 [7], 1, 2)
    shutil.copy(tmp_path / "axial" / "7.dcm", tmp_path / "s" / "7.dcm")
    # a sagittal slice of another series
    write_sagittal(tmp_path / "other", [12.0], instances=[8])
    import pydicom

    ds = pydicom.dcmread(tmp_path / "other" / "8.dcm")
    ds.SeriesInstanceUID = "1.2.3.4"
    ds.save_as(tmp_path / "s" / "8.dcm")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vol = read_series(tmp_path / "s")
    messages = [str(w.message) for w in caught if issubclass(w.category, DicomWarning)]
    assert sorted(vol.instance_numbers) == [1, 2, 3, 4]
    assert any("8.dcm: slice of another series skipped (SeriesInstanceUID 1.2.3.4 while 5 of 6" in m for m in messages)
    assert any("7.dcm: slice of another series skipped (axial slice among 4 sagittal slices of 5)" in m
               for m in messages), messages


def _rewrite_monochrome1(folder, signed=False):
    """Every file of a folder as the same picture in MONOCHROME1 (low values display white):
    ``max - p`` over the stored bits, native files stay native, RLE files are re-encoded RLE."""
    import pydicom
    from pydicom.uid import RLELossless

    for f in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        p = ds.pixel_array.astype(np.int64)
        inverted = (-1 - p) if signed else ((1 << int(ds.BitsStored)) - 1 - p)
        arr = inverted.astype(ds.pixel_array.dtype)
        ds.PhotometricInterpretation = "MONOCHROME1"
        if ds.file_meta.TransferSyntaxUID == RLELossless:
            ds.compress(RLELossless, arr, encoding_plugin="pydicom")
        else:
            ds.PixelData = arr.tobytes()
        ds.save_as(f, enforce_file_format=False)


def test_monochrome1_reads_as_bright_high_signal_native_and_rle(tmp_path):
    """A series stored as MONOCHROME1 (it displays the same in any viewer) gives the same volume
    as its MONOCHROME2 original, never an inverted one."""
    a, b = tmp_path / "m2", tmp_path / "m1"
    write_sagittal(a, [0.0, 3.0, 6.0, 9.0], [1, 2, 3, 4], dots=[(5, 6), (7, 8), None, (9, 9)], rle_every=2)
    shutil.copytree(a, b)
    _rewrite_monochrome1(b)
    import pydicom

    assert {pydicom.dcmread(f).PhotometricInterpretation for f in b.glob("*.dcm")} == {"MONOCHROME1"}
    assert {str(pydicom.dcmread(f).file_meta.TransferSyntaxUID) for f in b.glob("*.dcm")} == {
        "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.5"}  # both decoder paths
    m2, m1 = read_series(a), read_series(b)
    assert len(m1) == len(m2) == 4 and not m1.skipped
    for x, y in zip(m2.images, m1.images):
        np.testing.assert_array_equal(x, y)


def test_monochrome1_signed_and_through_the_pydicom_fallback(tmp_path):
    from trainer.data.dicom import bright_is_high, read_slice

    signed = tmp_path / "signed.dcm"  # pydicom's MR_small: signed 16-bit, BitsStored 16
    shutil.copy(get_testdata_file("MR_small.dcm"), signed)
    original = read_slice(signed).pixels.astype(np.int64)
    _rewrite_monochrome1(tmp_path, signed=True)
    np.testing.assert_array_equal(read_slice(signed).pixels.astype(np.int64), original)
    # the pydicom path (a file dicomsdl is not given): big endian goes there
    import pydicom

    ds = pydicom.dcmread(get_testdata_file("MR_small_bigendian.dcm"))
    big = tmp_path / "big.dcm"
    shutil.copy(get_testdata_file("MR_small_bigendian.dcm"), big)
    ref = read_slice(big).pixels.astype(np.int64)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(big, enforce_file_format=False)
    assert np.corrcoef(read_slice(big).pixels.astype(np.int64).ravel(), ref.ravel())[0, 1] == pytest.approx(-1)
    np.testing.assert_array_equal(bright_is_high(np.array([0, 4095], np.uint16), "MONOCHROME1", 12, False),
                                  [4095, 0])
    np.testing.assert_array_equal(bright_is_high(np.array([-2048, 2047], np.int16), "MONOCHROME1", 12, True),
                                  [2047, -2048])
    with pytest.raises(ValueError, match="PALETTE COLOR"):
        bright_is_high(np.zeros(2, np.uint16), "PALETTE COLOR", 12, False)
