"""A phantom RSNA 2024 dataset: real DICOM files in the exact competition layout, with a crude
lumbar anatomy whose degeneration is visible and learnable.

The anatomy is an analytic function of patient position (DICOM LPS, mm), and every slice of every
series samples it at its own pixels' patient positions. The three series of a study therefore share
one 3-D geometry by construction: an axial slice through a disc cuts the same disc that the
sagittal series show. Severity changes the anatomy where a radiologist would look:

- spinal canal stenosis: the CSF column (bright on T2) pinches at the disc, seen on mid-sagittal T2;
- neural foraminal narrowing: the fat-filled foramen (bright on T1) shrinks, seen on the lateral
  sagittal T1 slices on that side of the patient (+x is the patient's left);
- subarticular stenosis: the lateral recess of the canal closes on that side, seen on axial T2.

Each study varies image size, pixel spacing, slice counts, midline offset, axial stack tilt,
slice order (reversed stacks, FFS axial images that mirror left and right), instance numbers that
do not start at 1 and sometimes jump. Degrees of degeneration overlap between grades and there is
Rician noise, so the task is learnable but not trivially separable.
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, RLELossless, generate_uid
from scipy.stats import norm

from ..errors import UserError
from .dicom import Volume
from .geometry import nearest_slice, patient_to_pixel
from .layout import CONDITION_NAMES, CONDITIONS, LABEL_COLUMNS, LEVEL_NAMES, LEVELS, SEVERITIES

# Per-level rates of Moderate and Severe (L1/L2 .. L5/S1): lower levels are worse. Averaged over
# levels this gives about 80 / 13 / 7 % Normal-Mild / Moderate / Severe.
MODERATE_RATE = np.array([0.07, 0.10, 0.13, 0.18, 0.16])
SEVERE_RATE = np.array([0.02, 0.04, 0.07, 0.12, 0.10])
EMPTY_RATE = {"subarticular": 0.03, "other": 0.002}  # about 1% of cells, mostly subarticular
# degree of degeneration in [0, 1] per grade, overlapping on purpose: Beta(a, b)
DEGREE_BETA = ((2.0, 7.0), (6.0, 6.0), (8.0, 2.5))

# Tissue intensities per sequence: background, vertebral body, disc, CSF, ligament, fat, nerve, bone
TISSUES = ("bg", "body", "disc", "csf", "lig", "fat", "nerve", "bone")
INTENSITY = {
    "T1": dict(bg=0.25, body=0.62, disc=0.33, csf=0.12, lig=0.18, fat=0.92, nerve=0.28, bone=0.42),
    "T2": dict(bg=0.20, body=0.42, disc=0.72, csf=0.95, lig=0.10, fat=0.55, nerve=0.25, bone=0.30),
}
FORAMEN_X = 20.0  # mm lateral of the midline
RECESS_X = 9.5


@dataclass(frozen=True)
class Scale:
    """How big a phantom's files are. `small` (the default) keeps the demo fast on a CPU; `real`
    mirrors the competition set (DOMAIN.md): 384-640 px matrices, sagittal stacks of 13-21
    slices, one to three Axial T2 series per study of mostly 15-50 slices (a few continuous thin
    stacks of up to 190), every file RLE lossless 12-bit."""

    name: str
    sagittal_sizes: tuple[int, ...]
    axial_sizes: tuple[int, ...]
    sag_t1_slices: tuple[int, int]  # [low, high) of the slice count
    sag_t2_slices: tuple[int, int]
    render_step: int  # the anatomy is evaluated every k-th pixel, then resized (real: half the cost x4)


SCALES = {
    "small": Scale("small", (192, 224, 256, 288), (192, 224, 256), (15, 20), (13, 18), 1),
    "real": Scale("real", (384, 448, 512, 512, 512, 640), (320, 384, 448, 512, 512, 640), (13, 22), (14, 20), 2),
}


@dataclass
class Anatomy:
    """One patient's lumbar spine; degrees are (5 conditions, 5 levels) in [0, 1]."""

    midline_x: float
    disc_z: np.ndarray  # (5,) disc centres, L1/L2 first (head is +z)
    canal_y0: float
    lordosis: float
    disc_height: float
    canal_rx: float
    canal_ry: float
    degree: np.ndarray  # (5, 5)
    texture: np.ndarray  # (3, 4): low-frequency background waves (kx, ky, kz, phase)

    def canal_y(self, z):
        mid = self.disc_z.mean()
        return self.canal_y0 - self.lordosis * ((z - mid) / 80.0) ** 2

    def nearest_level(self, Z):
        step = self.disc_z[0] - self.disc_z[1]
        return np.clip(np.rint((self.disc_z[0] - Z) / step), 0, 4).astype(np.intp)

    def render(self, X, Y, Z, seq: str) -> np.ndarray:
        """Intensity in [0, 1] at patient points (arrays of any shape)."""
        t = INTENSITY[seq]
        xm = X - self.midline_x
        yc = self.canal_y(Z)
        out = np.full(X.shape, t["bg"], dtype=np.float32)
        out += 0.03 * sum(np.sin(k[0] * X + k[1] * Y + k[2] * Z + k[3]) for k in self.texture)

        # discs are equally spaced, so the nearest one is found in closed form
        lvl = self.nearest_level(Z)
        dz = Z - self.disc_z[lvl]
        bump = np.exp(-((dz / 5.0) ** 2))  # 1 at the disc's height, fading over a few mm
        in_disc = np.abs(dz) < self.disc_height / 2

        # vertebral column (bodies and discs) anterior of the canal
        column = (xm / 22.0) ** 2 + ((Y - (yc - self.canal_ry - 17.0)) / 16.0) ** 2 < 1
        out[column] = t["body"]
        out[column & in_disc] = t["disc"]

        # posterior elements behind the canal, and the pedicles around each foramen
        post_ant = yc + self.canal_ry
        posterior = (np.abs(xm) < 28) & (Y > post_ant + 1) & (Y < post_ant + 30)
        out[posterior] = t["bone"]

        # canal: the disc pushes the anterior wall back by up to 75% of the canal's depth
        scs = bump * self.degree[0][lvl]
        ant = yc - self.canal_ry + 1.5 * self.canal_ry * scs
        post = yc + self.canal_ry
        cy, hy = (ant + post) / 2, (post - ant) / 2
        full_canal = (xm / self.canal_rx) ** 2 + ((Y - yc) / self.canal_ry) ** 2 < 1
        canal = (xm / self.canal_rx) ** 2 + ((Y - cy) / np.maximum(hy, 0.5)) ** 2 < 1
        out[full_canal] = t["lig"]
        out[canal] = t["csf"]

        # lateral recesses (subarticular zones): close on their own side near the disc
        for side, cond in ((+1, 3), (-1, 4)):  # +x is the patient's left
            closing = bump * self.degree[cond][lvl]
            r = 3.6 * (1 - 0.85 * closing)
            recess = ((xm - side * RECESS_X) ** 2 + (Y - (yc + 2.0)) ** 2) < r**2
            out[recess & ~canal] = t["csf"]

        # foramina: fat-filled keyholes between pedicles, lateral on each side, shrinking with degree
        for side, cond in ((+1, 1), (-1, 2)):
            xf = xm - side * FORAMEN_X
            near = np.abs(xf) < 8
            if not near.any():
                continue
            lvf = self.nearest_level(Z - 5.0)  # foramina sit a little above their disc
            dzl = Z - 5.0 - self.disc_z[lvf]
            deg = self.degree[cond][lvf]
            yf = yc - 1.0
            pedicle = near & (((Y - yf) / 9.0) ** 2 + (dzl / 14.0) ** 2 < 1)
            s = 1 - 0.7 * deg
            fat = near & (np.abs(xf) < 6) & (((Y - yf) / 5.5) ** 2 + (dzl / 8.5) ** 2 < s**2)
            nerve = fat & ((Y - yf) ** 2 + (dzl - 2.5 * s) ** 2 < 2.2**2)
            out[pedicle] = t["bone"]
            out[fat] = t["fat"]
            out[nerve] = t["nerve"]
        return out


def _grades(rng: np.random.Generator) -> np.ndarray:
    """(5 conditions, 5 levels) grades 0/1/2, -1 for an empty cell; correlated within a patient."""
    patient = rng.normal() * 0.8
    total_sd = np.sqrt(1 + 0.8**2)
    grades = np.zeros((5, 5), dtype=int)
    for c, cond in enumerate(CONDITIONS):
        latent = patient + rng.normal(size=5)
        severe = latent > norm.ppf(1 - SEVERE_RATE) * total_sd
        moderate = latent > norm.ppf(1 - SEVERE_RATE - MODERATE_RATE) * total_sd
        grades[c] = np.where(severe, 2, np.where(moderate, 1, 0))
        p_empty = EMPTY_RATE["subarticular" if "subarticular" in cond else "other"]
        grades[c][rng.random(5) < p_empty] = -1
    return grades


def _anatomy(rng: np.random.Generator, grades: np.ndarray) -> Anatomy:
    degree = np.zeros((5, 5))
    for g in (0, 1, 2):
        a, b = DEGREE_BETA[g]
        mask = grades == g
        degree[mask] = rng.beta(a, b, size=mask.sum())
    empty = grades < 0  # an unlabelled cell still has some anatomy, unknown to the labels
    degree[empty] = rng.beta(2.0, 5.0, size=empty.sum())
    spacing = rng.uniform(33.0, 38.0)
    top = rng.uniform(55.0, 75.0)
    return Anatomy(
        midline_x=rng.uniform(-6, 6),
        disc_z=top - spacing * np.arange(5),
        canal_y0=rng.uniform(15, 25),
        lordosis=rng.uniform(4, 12),
        disc_height=rng.uniform(7, 10),
        canal_rx=rng.uniform(7.0, 9.0),
        canal_ry=rng.uniform(6.0, 7.5),
        degree=degree,
        texture=np.column_stack([rng.normal(0, 0.05, (3, 3)), rng.uniform(0, 2 * np.pi, 3)]),
    )


@dataclass
class SeriesPlan:
    description: str
    seq: str
    positions: np.ndarray  # (S, 3)
    orientations: np.ndarray  # (S, 6)
    spacing: float  # in-plane pixel spacing (mm)
    size: int  # rows = columns
    thickness: float
    slice_gap: float
    patient_position: str


def _sagittal_plan(rng, anat: Anatomy, description: str, seq: str, n_range, span_min: float,
                   sizes=SCALES["small"].sagittal_sizes) -> SeriesPlan:
    size = int(rng.choice(list(sizes)))
    fov = rng.uniform(200, 240)
    n = int(rng.integers(*n_range))
    gap = max(rng.uniform(3.3, 4.2), span_min / (n - 1))
    xs = anat.midline_x + rng.uniform(-2, 2) + (np.arange(n) - (n - 1) / 2) * gap
    zc = anat.disc_z.mean() + rng.uniform(-10, 10)
    yc = anat.canal_y0 - 15 + rng.uniform(-10, 10)
    # row direction: anterior -> posterior (+y); column direction: head -> feet (-z)
    orient = np.array([0, 1, 0, 0, 0, -1], dtype=float)
    pos = np.column_stack([xs, np.full(n, yc - fov / 2), np.full(n, zc + fov / 2)])
    return SeriesPlan(description, seq, pos, np.tile(orient, (n, 1)), fov / size, size,
                      gap * 0.9, gap, "HFS")


def _axial_plan(rng, anat: Anatomy, ffs: bool) -> SeriesPlan:
    size = int(rng.choice([192, 224, 256]))
    fov = rng.uniform(160, 200)
    gap = rng.uniform(3.0, 4.0)
    positions, orients = [], []
    for z in anat.disc_z:  # one short stack per disc, tilted with the disc
        k = int(rng.integers(3, 6))
        tilt = np.deg2rad(rng.uniform(-10, 10))
        row = np.array([-1.0 if ffs else 1.0, 0, 0])  # FFS images are mirrored left-right
        col = np.array([0, np.cos(tilt), -np.sin(tilt)])
        normal = np.cross([1.0, 0, 0], col)  # patient-superior for every stack
        centre = np.array([anat.midline_x, anat.canal_y(z) - 12, z])
        for j in np.arange(k) - (k - 1) / 2:
            c = centre + j * gap * normal
            positions.append(c - row * fov / 2 - col * fov / 2)
            orients.append(np.concatenate([row, col]))
    order = np.argsort([-p @ [0, 0, 1] for p in positions])  # head first, like a scanner
    return SeriesPlan("Axial T2", "T2", np.asarray(positions)[order], np.asarray(orients)[order],
                      fov / size, size, gap * 0.9, gap, "FFS" if ffs else "HFS")


def _real_axial_plans(rng, anat: Anatomy, ffs: bool, scale: Scale) -> list[SeriesPlan]:
    """One to three Axial T2 series: the first covers every level (stacks per disc, or one
    continuous stack, rarely a thin one of up to 190 slices), the others repeat the lower levels."""
    n_series = int(rng.choice([1, 2, 3], p=[0.7, 0.25, 0.05]))
    plans = []
    for k in range(n_series):
        size = int(rng.choice(list(scale.axial_sizes)))
        fov = rng.uniform(160, 200)
        row = np.array([-1.0 if ffs else 1.0, 0, 0])
        kind = "stacks" if k > 0 or rng.random() < 0.6 else ("thin" if rng.random() < 0.08 else "continuous")
        positions, orients = [], []
        if kind == "stacks":
            discs = anat.disc_z if k == 0 else anat.disc_z[2:]
            gap = rng.uniform(3.0, 4.0)
            for z in discs:
                per = int(rng.integers(3, 9))
                tilt = np.deg2rad(rng.uniform(-10, 10))
                col = np.array([0, np.cos(tilt), -np.sin(tilt)])
                normal = np.cross([1.0, 0, 0], col)
                centre = np.array([anat.midline_x, anat.canal_y(z) - 12, z])
                for j in np.arange(per) - (per - 1) / 2:
                    c = centre + j * gap * normal
                    positions.append(c - row * fov / 2 - col * fov / 2)
                    orients.append(np.concatenate([row, col]))
        else:
            gap = rng.uniform(1.0, 1.2) if kind == "thin" else rng.uniform(4.0, 5.0)
            col = np.array([0, 1.0, 0])
            top, bottom = anat.disc_z[0] + 15, anat.disc_z[-1] - 15
            for z in np.arange(top, bottom, -gap):
                c = np.array([anat.midline_x, anat.canal_y(z) - 12, z])
                positions.append(c - row * fov / 2 - col * fov / 2)
                orients.append(np.concatenate([row, col]))
        order = np.argsort([-p[2] for p in positions])  # head first, like a scanner
        plans.append(SeriesPlan("Axial T2", "T2", np.asarray(positions)[order], np.asarray(orients)[order],
                                fov / size, size, gap * 0.9, gap, "FFS" if ffs else "HFS"))
    return plans


def _render_series(rng, anat: Anatomy, plan: SeriesPlan, step: int = 1) -> list[np.ndarray]:
    """12-bit slices: the anatomy sampled at every pixel's patient position (every `step`-th
    pixel, then resized), blurred a little, with Rician noise at full resolution."""
    n = plan.size
    m = -(-n // step)
    grid_y, grid_x = (np.mgrid[0:m, 0:m].astype(np.float32) * step)
    gain = rng.uniform(1400, 3200)
    sigma = rng.uniform(0.035, 0.07)
    images = []
    for pos, o in zip(plan.positions, plan.orientations):
        pts = (pos[:, None, None] + grid_x * plan.spacing * o[:3, None, None]
               + grid_y * plan.spacing * o[3:, None, None])
        img = anat.render(pts[0], pts[1], pts[2], plan.seq)
        if step == 1:
            img = cv2.GaussianBlur(img, (0, 0), 0.8)  # partial-volume look
            noisy = np.sqrt((img + rng.normal(0, sigma, img.shape)) ** 2 + rng.normal(0, sigma, img.shape) ** 2)
        else:
            img = cv2.resize(img, (m * step, m * step), interpolation=cv2.INTER_LINEAR)[:n, :n]
            img = cv2.GaussianBlur(img, (0, 0), 0.8)
            a = img + rng.standard_normal(img.shape, dtype=np.float32) * sigma
            b = rng.standard_normal(img.shape, dtype=np.float32) * sigma
            noisy = np.sqrt(a * a + b * b)
        images.append(np.clip(noisy * gain, 0, 4095).astype(np.uint16))
    return images


def _instance_numbers(rng, n: int) -> np.ndarray:
    start = 1 if rng.random() < 0.6 else int(rng.integers(2, 3000))
    numbers = start + np.arange(n)
    if rng.random() < 0.15 and n > 4:  # a jump, as in real series (24 -> 5031 seen)
        numbers[n // 2:] += int(rng.integers(100, 5000))
    if rng.random() < 0.3:  # reversed stack: instance 1 at the other end
        numbers = numbers[::-1].copy()
    return numbers


# pylibjpeg-rle encodes about 7x faster than pydicom's own encoder, to files of the same size and pixels
_RLE_PLUGIN = "pylibjpeg" if importlib.util.find_spec("pylibjpeg") and importlib.util.find_spec("rle") else "pydicom"


def write_series(folder: Path, images: list[np.ndarray], plan: SeriesPlan, instance_numbers,
                 study_id: int, series_id: int, with_thickness: bool = True, rle_every: int = 0) -> None:
    """Write one series as ``<instance>.dcm`` files: 16-bit MONOCHROME2 MR with full geometry.
    Without `with_thickness`, SliceThickness and SpacingBetweenSlices are left out (as the hidden
    test set may do); every `rle_every`-th file is RLE-compressed."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    uids = dict(study=generate_uid(entropy_srcs=[str(study_id), "study"]),
                frame=generate_uid(entropy_srcs=[str(study_id), "frame"]),
                series=generate_uid(entropy_srcs=[str(study_id), str(series_id)]))
    for i, (image, instance) in enumerate(zip(images, instance_numbers)):
        _write_dicom(folder / f"{instance}.dcm", image, plan, i, int(instance), uids, study_id, series_id,
                     with_thickness, rle=bool(rle_every) and i % rle_every == 0)


def _write_dicom(path: Path, image: np.ndarray, plan: SeriesPlan, i: int, instance: int,
                 uids: dict, study_id: int, series_id: int, with_thickness: bool, rle: bool) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    sop_uid = generate_uid(entropy_srcs=[uids["series"], str(instance)])
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = uids["study"]
    ds.SeriesInstanceUID = uids["series"]
    ds.FrameOfReferenceUID = uids["frame"]
    ds.Modality = "MR"
    ds.PatientID = str(study_id)
    ds.StudyID = str(study_id)
    ds.SeriesNumber = series_id % 100000
    ds.SeriesDescription = plan.description
    ds.PatientPosition = plan.patient_position
    ds.InstanceNumber = int(instance)
    ds.ImagePositionPatient = [round(float(v), 4) for v in plan.positions[i]]
    ds.ImageOrientationPatient = [round(float(v), 6) for v in plan.orientations[i]]
    ds.PixelSpacing = [round(plan.spacing, 6), round(plan.spacing, 6)]
    normal = np.cross(plan.orientations[i][:3], plan.orientations[i][3:])
    ds.SliceLocation = round(float(plan.positions[i] @ normal), 4)
    if with_thickness:
        ds.SliceThickness = round(plan.thickness, 3)
        ds.SpacingBetweenSlices = round(plan.slice_gap, 3)
    ds.Rows, ds.Columns = image.shape
    image = np.ascontiguousarray(image, dtype=np.uint16)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = image.tobytes()
    if rle:
        ds.compress(RLELossless, image, encoding_plugin=_RLE_PLUGIN)
    ds.save_as(path, enforce_file_format=True)


def _make_study(root: Path, split: str, study_id: int, seed_seq, with_labels: bool, scale: str = "small") -> dict:
    rng = np.random.default_rng(seed_seq)
    grades = _grades(rng)
    anat = _anatomy(rng, grades)
    ffs = rng.random() < 0.25
    sc = SCALES[scale]
    plans = [
        _sagittal_plan(rng, anat, "Sagittal T1", "T1", sc.sag_t1_slices, span_min=2 * FORAMEN_X + 16,
                       sizes=sc.sagittal_sizes),
        _sagittal_plan(rng, anat, "Sagittal T2/STIR", "T2", sc.sag_t2_slices, span_min=24, sizes=sc.sagittal_sizes),
    ]
    plans += [_axial_plan(rng, anat, ffs)] if scale == "small" else _real_axial_plans(rng, anat, ffs, sc)
    if scale == "small":
        rle_series = int(rng.integers(0, 3)) if rng.random() < 0.1 else -1  # some files RLE-compressed
    series_rows, volumes = [], {}
    for k, plan in enumerate(plans):
        series_id = int(rng.integers(10_000_000, 4_000_000_000))
        images = _render_series(rng, anat, plan, sc.render_step)
        instances = _instance_numbers(rng, len(images))
        rle_every = (4 if k == rle_series else 0) if scale == "small" else 1
        write_series(root / f"{split}_images" / str(study_id) / str(series_id), images, plan, instances,
                     study_id, series_id, with_thickness=(split == "train"), rle_every=rle_every)
        series_rows.append((study_id, series_id, plan.description))
        if plan.description not in volumes:  # labels go on the first series of each kind
            volumes[plan.description] = (series_id, Volume(
                images=images, positions=plan.positions, orientations=plan.orientations,
                spacings=np.full((len(images), 2), plan.spacing), instance_numbers=instances))

    coords = []
    jitter = lambda: rng.normal(0, 0.6, 3)  # annotators are not exact
    for c, cond in enumerate(CONDITIONS):
        for lv, level in enumerate(LEVELS):
            if grades[c, lv] < 0 or not with_labels:
                continue
            z = anat.disc_z[lv]
            yc = anat.canal_y(z)
            if cond == "spinal_canal_stenosis":
                desc, point = "Sagittal T2/STIR", np.array([anat.midline_x, yc, z])
            elif "foraminal" in cond:
                side = 1 if cond.startswith("left") else -1
                zf = z + 5.0
                desc, point = "Sagittal T1", np.array([anat.midline_x + side * FORAMEN_X, anat.canal_y(zf) - 1, zf])
            else:
                side = 1 if cond.startswith("left") else -1
                desc, point = "Axial T2", np.array([anat.midline_x + side * RECESS_X, yc + 2.0, z])
            series_id, vol = volumes[desc]
            idx, _, _, _ = nearest_slice(vol, point + jitter())
            x, y, _ = patient_to_pixel(vol, idx, point + jitter())
            coords.append((study_id, series_id, int(vol.instance_numbers[idx]), CONDITION_NAMES[cond],
                           LEVEL_NAMES[level], round(x, 3), round(y, 3)))
    label_row = {"study_id": study_id}
    for c, cond in enumerate(CONDITIONS):
        for lv, level in enumerate(LEVELS):
            g = grades[c, lv]
            label_row[f"{cond}_{level}"] = SEVERITIES[g] if g >= 0 else None
    return dict(series=series_rows, coords=coords, labels=label_row)


def _study_ids(seed: int, n: int) -> list[int]:
    rng = np.random.default_rng([seed, 0xC0FFEE])
    ids: set[int] = set()
    while len(ids) < n:
        ids.add(int(rng.integers(4_000_000, 4_290_000_000)))
    return sorted(ids)


def make_phantom(out_dir: Path, studies: int = 50, test_studies: int = 3, seed: int = 0,
                 jobs: int = 1, scale: str = "small", progress: bool = False) -> dict:
    """Write a phantom dataset to `out_dir` (created; existing phantom files are replaced).
    `scale`: "small" (the default, fast) or "real" (the competition's sizes, see `Scale`).

    Returns a summary dict. The hidden test labels go to ``_phantom/test_labels.csv`` (a folder the
    real data does not have) so that a phantom submission can be scored.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = _study_ids(seed, studies + test_studies)
    rng = np.random.default_rng([seed, 0xBEEF])
    rng.shuffle(ids)
    train_ids, test_ids = sorted(ids[:studies]), sorted(ids[studies:])
    if scale not in SCALES:
        raise UserError(f"phantom scale {scale!r}: expected one of {', '.join(SCALES)}")
    tasks = [("train", sid, [seed, sid], True, scale) for sid in train_ids]
    tasks += [("test", sid, [seed, sid], False, scale) for sid in test_ids]
    from tqdm import tqdm

    bar = tqdm(total=len(tasks), desc=f"phantom ({scale})", unit="study", disable=not progress, leave=False)
    if jobs > 1:
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(jobs) as pool:
            results = []
            for r in pool.map(_make_study_star, [(out_dir,) + t for t in tasks]):
                results.append(r)
                bar.update(1)
    else:
        results = []
        for t in tasks:
            results.append(_make_study(out_dir, *t))
            bar.update(1)
    bar.close()
    train = [r for r, t in zip(results, tasks) if t[0] == "train"]
    test = [r for r, t in zip(results, tasks) if t[0] == "test"]

    labels = pd.DataFrame([r["labels"] for r in train], columns=("study_id",) + LABEL_COLUMNS)
    labels.to_csv(out_dir / "train.csv", index=False)
    coord_cols = ["study_id", "series_id", "instance_number", "condition", "level", "x", "y"]
    pd.DataFrame([c for r in train for c in r["coords"]], columns=coord_cols).to_csv(
        out_dir / "train_label_coordinates.csv", index=False)
    series_cols = ["study_id", "series_id", "series_description"]
    pd.DataFrame([s for r in train for s in r["series"]], columns=series_cols).to_csv(
        out_dir / "train_series_descriptions.csv", index=False)
    pd.DataFrame([s for r in test for s in r["series"]], columns=series_cols).to_csv(
        out_dir / "test_series_descriptions.csv", index=False)
    sub = pd.DataFrame(
        [(f"{sid}_{c}_{lv}", 1 / 3, 1 / 3, 1 / 3) for sid in test_ids for c in CONDITIONS for lv in LEVELS],
        columns=["row_id", "normal_mild", "moderate", "severe"])
    sub.to_csv(out_dir / "sample_submission.csv", index=False)
    hidden = out_dir / "_phantom"
    hidden.mkdir(exist_ok=True)
    pd.DataFrame([r["labels"] for r in test], columns=("study_id",) + LABEL_COLUMNS).to_csv(
        hidden / "test_labels.csv", index=False)
    values = labels[list(LABEL_COLUMNS)].to_numpy().ravel()
    summary = dict(
        studies=len(train_ids), test_studies=len(test_ids), seed=seed, scale=scale,
        series=int(sum(len(r["series"]) for r in results)),
        points=int(sum(len(r["coords"]) for r in train)),
        files=sum(1 for _ in out_dir.glob("*_images/*/*/*.dcm")),
        bytes=sum(f.stat().st_size for f in out_dir.glob("*_images/*/*/*.dcm")),
        grades={s: int((values == s).sum()) for s in SEVERITIES} | {"empty": int(pd.isna(values).sum())},
    )
    (hidden / "meta.json").write_text(json.dumps(summary, indent=2))
    return summary


def _make_study_star(args):
    return _make_study(*args)
