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
_TOTAL_SD = np.sqrt(1 + 0.8**2)  # of a cell's latent severity: the patient's share (sd 0.8) plus the cell's (sd 1)
# the latent thresholds of Severe and of Moderate-or-worse per level, so that each grade comes at its rate
_SEVERE_AT = norm.ppf(1 - SEVERE_RATE) * _TOTAL_SD
_MODERATE_AT = norm.ppf(1 - SEVERE_RATE - MODERATE_RATE) * _TOTAL_SD
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

    midline_x: float  # patient x of the midline at the middle disc
    disc_z: np.ndarray  # (5,) disc centres, L1/L2 first (head is +z)
    canal_y0: float
    lordosis: float
    disc_height: float
    canal_rx: float
    canal_ry: float
    degree: np.ndarray  # (5, 5)
    texture: np.ndarray  # (3, 4): low-frequency background waves (kx, ky, kz, phase)
    lateral: float = 0.0  # a lateral (scoliotic) curve: the midline moves this far (mm) at L1/L2 and L5/S1

    def midline(self, z):
        """Patient x of the midline at height z: straight, or drifting to one side."""
        return self.midline_x + self.lateral * (z - self.disc_z.mean()) / 70.0

    def canal_y(self, z):
        """Patient y (mm) of the canal's centre at height z: a parabola, `canal_y0` at the mean disc height,
        `lordosis` mm less (anterior) 80 mm above or below it."""
        mid = self.disc_z.mean()
        return self.canal_y0 - self.lordosis * ((z - mid) / 80.0) ** 2

    def nearest_level(self, Z):
        """Index of the nearest disc (0 = L1/L2 ... 4 = L5/S1) to each height in `Z` (mm), an intp array of
        `Z`'s shape; the discs are equally spaced."""
        step = self.disc_z[0] - self.disc_z[1]
        return np.clip(np.rint((self.disc_z[0] - Z) / step), 0, 4).astype(np.intp)

    def render(self, X, Y, Z, seq: str) -> np.ndarray:
        """Intensity in [0, 1] at patient points (arrays of any shape)."""
        t = INTENSITY[seq]
        xm = X - self.midline(Z)
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
    grades = np.zeros((5, 5), dtype=int)
    for c, cond in enumerate(CONDITIONS):
        latent = patient + rng.normal(size=5)
        severe = latent > _SEVERE_AT
        moderate = latent > _MODERATE_AT
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
    # most spines are straight in the coronal plane; about one in four drifts a few mm sideways,
    # so that its canal points fall on two or more sagittal slices (22% of real studies)
    lateral = rng.uniform(2.0, 7.0) * rng.choice([-1, 1]) if rng.random() < 0.25 else rng.normal(0, 0.5)
    return Anatomy(
        lateral=float(lateral),
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
    """Where one series' slices lie: per slice the DICOM ImagePositionPatient (mm) and
    ImageOrientationPatient, pixel spacing, size (pixels), slice thickness and gap (mm), patient position
    (HFS/FFS), and the sequence (`INTENSITY` key) rendered."""

    description: str
    seq: str
    positions: np.ndarray  # (S, 3)
    orientations: np.ndarray  # (S, 6)
    spacing: float  # in-plane pixel spacing (mm)
    size: int  # rows = columns
    thickness: float
    slice_gap: float
    patient_position: str
    levels: tuple[int, ...] = ()  # Axial T2: the levels (0 = L1/L2) this series' subarticular labels sit on


@dataclass(frozen=True)
class SagittalView:
    """Where a study's sagittal series put the spine, shared by its T1 and T2 (one session).

    As in the real set (DOMAIN.md, "Where the points are"), the lumbar spine wanders in the field
    of view: the field of view (so the pixel spacing), the spine's place in it (`offset_y`,
    `offset_z`, mm from the image centre), the in-plane tilt and the lateral place of the stack
    all vary, so a mean position in pixels misses most labelled points by a disc or more."""

    fov: float  # mm
    offset_y: float  # the image centre minus the spine's centre, mm, anterior -> posterior
    offset_z: float  # ... head -> feet
    tilt: float  # radians, in the sagittal plane
    stack_offset: float  # the stack's centre minus the midline, in slice gaps


def _sagittal_view(rng, anat: Anatomy) -> SagittalView:
    fov = rng.uniform(200, 320)
    tilt = np.deg2rad(np.clip(rng.normal(0, 7), -18, 18))
    offset_y, offset_z = rng.normal(0, 0.2 * fov, 2)
    # keep every labelled point inside the image, 6% of the field of view from its edges
    for _ in range(40):
        view = SagittalView(fov, offset_y, offset_z, tilt, float(np.clip(rng.normal(0, 1.0), -2.5, 2.5)))
        extent = _sagittal_extent(anat, view)
        if extent.min() > 0.06 * fov and extent.max() < 0.94 * fov:
            return view
        offset_y, offset_z = 0.8 * offset_y, 0.8 * offset_z
    return SagittalView(fov, 0.0, 0.0, 0.0, view.stack_offset)


def _sagittal_frame(anat: Anatomy, view: SagittalView) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row direction, column direction, patient (y, z) of the image centre)."""
    c, s = np.cos(view.tilt), np.sin(view.tilt)
    row = np.array([0, c, s])  # anterior -> posterior, tilted
    col = np.array([0, s, -c])  # head -> feet, tilted
    zc = anat.disc_z.mean()
    centre = np.array([anat.canal_y(zc) - 10.0 + view.offset_y, zc + view.offset_z])
    return row, col, centre


def _sagittal_extent(anat: Anatomy, view: SagittalView) -> np.ndarray:
    """Pixel-free image coordinates (mm from the top-left corner) of the labelled sagittal points."""
    row, col, centre = _sagittal_frame(anat, view)
    z = np.concatenate([anat.disc_z, anat.disc_z + 5.0])
    pts = np.column_stack([anat.canal_y(z) - 1.0, z])
    d = pts - centre
    return np.concatenate([d @ row[1:], d @ col[1:]]) + view.fov / 2


def _sagittal_plan(rng, anat: Anatomy, view: SagittalView, description: str, seq: str, n_range, lateral_reach: float,
                   sizes=SCALES["small"].sagittal_sizes) -> SeriesPlan:
    """A sagittal stack: `lateral_reach` mm either side of the midline must be covered (the
    foramina for T1, the canal for T2), whatever the stack's offset and the spine's lateral curve."""
    size = int(rng.choice(list(sizes)))
    fov = view.fov * rng.uniform(0.97, 1.03)
    n = int(rng.integers(*n_range))
    gap = rng.uniform(3.3, 4.2)
    offset = view.stack_offset * gap
    span_min = 2 * (lateral_reach + abs(offset) + abs(anat.lateral)) + 8
    gap = max(gap, span_min / (n - 1))
    xs = anat.midline_x + view.stack_offset * gap + (np.arange(n) - (n - 1) / 2) * gap
    row, col, (yc, zc) = _sagittal_frame(anat, view)
    yc, zc = yc + rng.normal(0, 3), zc + rng.normal(0, 3)  # the two series are positioned a little apart
    origin = np.array([0, yc, zc]) - row * fov / 2 - col * fov / 2
    pos = np.column_stack([xs, np.full(n, origin[1]), np.full(n, origin[2])])
    return SeriesPlan(description, seq, pos, np.tile(np.concatenate([row, col]), (n, 1)), fov / size, size,
                      gap * 0.9, gap, "HFS")


def _axial_series_levels(rng) -> list[tuple[int, ...]]:
    """Which levels each labelled Axial T2 series carries: one series in 83% of studies, two in
    15.5%, three or four in 1.5% (DOMAIN.md), each a contiguous run of levels."""
    k = int(rng.choice([1, 2, 3, 4], p=[0.83, 0.155, 0.01, 0.005]))
    cuts = sorted(rng.choice(np.arange(1, 5), size=k - 1, replace=False)) if k > 1 else []
    bounds = [0, *cuts, 5]
    return [tuple(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]


def _axial_stacks(rng, anat: Anatomy, levels, row, fov, centre_shift, per_range) -> tuple[list, list, float]:
    """One short stack per disc of `levels`, each tilted with its disc."""
    gap = rng.uniform(3.0, 4.0)
    positions, orients = [], []
    for lv in levels:
        z = anat.disc_z[lv]
        per = int(rng.integers(*per_range))
        tilt = np.deg2rad(rng.uniform(-10, 10))
        col = np.array([0, np.cos(tilt), -np.sin(tilt)])
        normal = np.cross([1.0, 0, 0], col)  # patient-superior for every stack
        centre = np.array([anat.midline(z), anat.canal_y(z) - 12, z]) + centre_shift
        for j in np.arange(per) - (per - 1) / 2:
            c = centre + j * gap * normal
            positions.append(c - row * fov / 2 - col * fov / 2)
            orients.append(np.concatenate([row, col]))
    return positions, orients, gap


def _axial_plan(rng, anat: Anatomy, ffs: bool, levels=tuple(range(5)), sizes=(192, 224, 256)) -> SeriesPlan:
    size = int(rng.choice(list(sizes)))
    fov = rng.uniform(160, 200)
    row = np.array([-1.0 if ffs else 1.0, 0, 0])  # FFS images are mirrored left-right
    shift = np.array([*np.clip(rng.normal(0, 0.06 * fov, 2), -0.15 * fov, 0.15 * fov), 0])
    positions, orients, gap = _axial_stacks(rng, anat, levels, row, fov, shift, (3, 6))
    order = np.argsort([-p @ [0, 0, 1] for p in positions])  # head first, like a scanner
    return SeriesPlan("Axial T2", "T2", np.asarray(positions)[order], np.asarray(orients)[order],
                      fov / size, size, gap * 0.9, gap, "FFS" if ffs else "HFS", tuple(levels))


def _real_axial_plans(rng, anat: Anatomy, ffs: bool, scale: Scale, labelled: list[tuple[int, ...]]) -> list[SeriesPlan]:
    """One to four Axial T2 series. With one labelled series, it covers every level (stacks per
    disc, or one continuous stack, rarely a thin one of up to 190 slices) and further unlabelled
    series repeat the lower levels; with several, each labelled series covers its own levels."""
    n_series = max(len(labelled), int(rng.choice([1, 2, 3], p=[0.7, 0.25, 0.05])))
    plans = []
    for k in range(n_series):
        levels = labelled[k] if k < len(labelled) else ()
        size = int(rng.choice(list(scale.axial_sizes)))
        fov = rng.uniform(160, 200)
        row = np.array([-1.0 if ffs else 1.0, 0, 0])
        shift = np.array([*np.clip(rng.normal(0, 0.06 * fov, 2), -0.15 * fov, 0.15 * fov), 0])
        single = len(labelled) == 1 and k == 0
        kind = "stacks" if not single or rng.random() < 0.6 else ("thin" if rng.random() < 0.08 else "continuous")
        if kind == "stacks":
            covered = levels if levels else tuple(range(2, 5))
            positions, orients, gap = _axial_stacks(rng, anat, covered, row, fov, shift, (3, 9))
        else:
            positions, orients = [], []
            gap = rng.uniform(1.0, 1.2) if kind == "thin" else rng.uniform(4.0, 5.0)
            col = np.array([0, 1.0, 0])
            top, bottom = anat.disc_z[0] + 15, anat.disc_z[-1] - 15
            for z in np.arange(top, bottom, -gap):
                c = np.array([anat.midline(z), anat.canal_y(z) - 12, z]) + shift
                positions.append(c - row * fov / 2 - col * fov / 2)
                orients.append(np.concatenate([row, col]))
        order = np.argsort([-p[2] for p in positions])  # head first, like a scanner
        plans.append(SeriesPlan("Axial T2", "T2", np.asarray(positions)[order], np.asarray(orients)[order],
                                fov / size, size, gap * 0.9, gap, "FFS" if ffs else "HFS", tuple(levels)))
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
        # keep the deterministic SOP Instance UID (pydicom would draw a random one)
        ds.compress(RLELossless, image, encoding_plugin=_RLE_PLUGIN, generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)


def _plan_study(rng, scale: str) -> tuple[np.ndarray, Anatomy, list[SeriesPlan]]:
    """A study's grades, anatomy and series (geometry only, no pixel rendered)."""
    grades = _grades(rng)
    anat = _anatomy(rng, grades)
    ffs = rng.random() < 0.25
    sc = SCALES[scale]
    view = _sagittal_view(rng, anat)
    plans = [
        _sagittal_plan(rng, anat, view, "Sagittal T1", "T1", sc.sag_t1_slices, lateral_reach=FORAMEN_X + 4,
                       sizes=sc.sagittal_sizes),
        _sagittal_plan(rng, anat, view, "Sagittal T2/STIR", "T2", sc.sag_t2_slices, lateral_reach=8,
                       sizes=sc.sagittal_sizes),
    ]
    labelled = _axial_series_levels(rng)
    if scale == "small":
        plans += [_axial_plan(rng, anat, ffs, levels) for levels in labelled]
    else:
        plans += _real_axial_plans(rng, anat, ffs, sc, labelled)
    return grades, anat, plans


def _geometry(plan: SeriesPlan, instances) -> Volume:
    """A pixel-free `Volume` of a plan: enough for `nearest_slice` and `patient_to_pixel`."""
    blank = np.zeros((0, 0), dtype=np.uint8)
    return Volume(images=[blank] * len(plan.positions), positions=plan.positions, orientations=plan.orientations,
                  spacings=np.full((len(plan.positions), 2), plan.spacing), instance_numbers=np.asarray(instances))


def _label_points(rng, study_id: int, grades: np.ndarray, anat: Anatomy, plans: list[SeriesPlan],
                  series_ids: list[int], instances: list[np.ndarray]) -> list[tuple]:
    """train_label_coordinates rows: each point on the slice of its series nearest to it (the
    canal on Sagittal T2/STIR, the foramina on Sagittal T1, the recesses on the Axial T2 series
    that carries the level), with an annotator's jitter."""
    first = {}
    for k, plan in enumerate(plans):
        first.setdefault(plan.description, k)
    axial_of = {lv: k for k, plan in enumerate(plans) if plan.description == "Axial T2" for lv in plan.levels}
    geometry: dict[int, Volume] = {}
    coords = []
    jitter = lambda: rng.normal(0, 0.6, 3)  # annotators are not exact
    for c, cond in enumerate(CONDITIONS):
        for lv, level in enumerate(LEVELS):
            if grades[c, lv] < 0:
                continue
            z = anat.disc_z[lv]
            yc = anat.canal_y(z)
            if cond == "spinal_canal_stenosis":
                k, point = first["Sagittal T2/STIR"], np.array([anat.midline(z), yc, z])
            elif "foraminal" in cond:
                side = 1 if cond.startswith("left") else -1
                zf = z + 5.0
                k = first["Sagittal T1"]
                point = np.array([anat.midline(zf) + side * FORAMEN_X, anat.canal_y(zf) - 1, zf])
            else:
                side = 1 if cond.startswith("left") else -1
                k, point = axial_of[lv], np.array([anat.midline(z) + side * RECESS_X, yc + 2.0, z])
            if k not in geometry:
                geometry[k] = _geometry(plans[k], instances[k])
            vol = geometry[k]
            idx, _, _, dist = nearest_slice(vol, point + jitter())
            if cond == "spinal_canal_stenosis":
                # an annotator marks the canal on one mid-sagittal slice, and moves to another only
                # where the spine has drifted off it (22% of real studies use 2-5 slices)
                ref = nearest_slice(vol, np.array([anat.midline_x, anat.canal_y(anat.disc_z[2]), anat.disc_z[2]]))[0]
                if abs(patient_to_pixel(vol, ref, point)[2]) < 0.75 * plans[k].slice_gap:
                    idx = ref
            x, y, _ = patient_to_pixel(vol, idx, point + jitter())
            coords.append((study_id, series_ids[k], int(vol.instance_numbers[idx]), CONDITION_NAMES[cond],
                           LEVEL_NAMES[level], round(x, 3), round(y, 3)))
    return coords


def _make_study(root: Path, split: str, study_id: int, seed_seq, with_labels: bool, scale: str = "small") -> dict:
    rng = np.random.default_rng(seed_seq)
    grades, anat, plans = _plan_study(rng, scale)
    series_ids = [int(rng.integers(10_000_000, 4_000_000_000)) for _ in plans]
    instances = [_instance_numbers(rng, len(plan.positions)) for plan in plans]
    coords = _label_points(rng, study_id, grades, anat, plans, series_ids, instances) if with_labels else []
    rle_series = int(rng.integers(0, len(plans))) if scale == "small" and rng.random() < 0.1 else -1
    series_rows = []
    for k, plan in enumerate(plans):
        images = _render_series(rng, anat, plan, SCALES[scale].render_step)
        rle_every = (4 if k == rle_series else 0) if scale == "small" else 1  # small: some files RLE-compressed
        write_series(root / f"{split}_images" / str(study_id) / str(series_ids[k]), images, plan, instances[k],
                     study_id, series_ids[k], with_thickness=(split == "train"), rle_every=rle_every)
        series_rows.append((study_id, series_ids[k], plan.description))
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
