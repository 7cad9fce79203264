"""What every training loop of the trainer shares (the classifier's in `fit`, the localiser's in
`points.fit`): the result type, devices, seeding, the learning-rate schedule, EMA weights, the
fold split, the environment record, DataLoader worker seeding. Imports neither optuna nor mlflow."""
from __future__ import annotations

import dataclasses
import math
import platform
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from .config import ConfigError, TrainConfig
from .data.folds import load_folds
from .data.layout import Layout

Callback = Callable[[int, dict], "bool | None"]


@dataclass
class FitResult:
    """What `fit` (or `points.fit`) returns for one fold: history, best epoch and its score, OOF rows,
    checkpoint and the run's record (environment, data fingerprint, sizes, seconds)."""

    config: TrainConfig
    history: list[dict]  # one dict of metrics per epoch
    best_epoch: int  # 1-based, chosen by config.select_by
    score: float  # validation score at the best epoch
    groups: dict[str, float]  # its per-group losses
    prior_score: float  # predicting the training fold's class frequencies on the same rows
    prior_groups: dict[str, float]
    oof: pd.DataFrame  # validation predictions at the best epoch, Kaggle form
    solution: pd.DataFrame  # the matching solution rows
    confusion: dict[str, list[list[int]]]  # per condition, rows = truth, columns = prediction
    checkpoint: str | None
    environment: dict
    pretrained_loaded: bool
    augment_pipeline: dict
    data_fingerprint: str
    n_train: int
    n_val: int
    stopped_early: bool = False
    stop_reason: str = ""
    seconds: float = 0.0
    tables: dict[str, pd.DataFrame] = dataclasses.field(default_factory=dict)  # more per-fold tables to keep, by file name


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; any other name as a torch device.

    Raises:
        RuntimeError: a CUDA device is named and CUDA is not available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} asked for, but CUDA is not available on this machine")
    return dev


def loader_workers(configured: int, device: torch.device) -> int:
    """DataLoader worker processes: the configured number, or for -1 (auto) on CUDA this
    process's core share (its torch threads, which a study's worker sets to cores / concurrent
    trials) less one for the training loop, at most 8; on the CPU none, since every core already
    trains and crops cost little next to a CPU forward pass."""
    if configured >= 0:
        return configured
    if device.type != "cuda":
        return 0
    return max(1, min(8, torch.get_num_threads() - 1))


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_lambda(cfg, total_steps: int) -> Callable[[int], float]:
    """The `LambdaLR` factor of an optimiser step: linear warmup over ``warmup_ratio`` of the steps, then
    constant, linear to 0, or half-cosine to 0 (``optim.scheduler``)."""
    warmup = int(cfg.optim.warmup_ratio * total_steps)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.optim.scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.optim.scheduler == "linear":
            return max(0.0, 1 - progress)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


class EMA:
    """Exponential moving average of the weights (and buffers), kept on the model's device."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(decay), use_buffers=True)

    def update(self, model):
        """Fold `model`'s current weights and buffers into the average."""
        self.model.update_parameters(model)


def optimizer_step(loss: torch.Tensor, model: torch.nn.Module, optimizer, scheduler, scaler, ema: "EMA | None",
                   grad_clip: float, epoch: int, step: int) -> None:
    """One training step after the forward pass: backward through the AMP `scaler` (a disabled one on
    CPU), gradient-norm clipping at `grad_clip` (0: none; on unscaled gradients), the optimiser and
    scheduler steps, the EMA update.

    Raises:
        FloatingPointError: `loss` is NaN or infinite (named with its `epoch` and 1-based `step`);
            nothing is updated."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"training loss is {loss.item()} at epoch {epoch}, step {step + 1}")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    if ema is not None:
        ema.update(model)


def train_val_split(layout: Layout, cfg: TrainConfig, cache_root: Path, fingerprint: str):
    """(training, validation) study ids of `cfg.data.fold`, sorted."""
    folds = load_folds(layout, cfg.data.n_folds, cfg.data.folds_seed, cache_root, fingerprint)
    if cfg.data.max_studies:
        # keep the first studies of every fold, so capped runs keep the same split
        per_fold = max(1, cfg.data.max_studies // cfg.data.n_folds)
        folds = folds.groupby("fold", group_keys=False).head(per_fold)
    val = folds.loc[folds["fold"] == cfg.data.fold, "study_id"].tolist()
    train = folds.loc[folds["fold"] != cfg.data.fold, "study_id"].tolist()
    if not val or not train:
        raise ConfigError(f"data.fold={cfg.data.fold}: empty train or validation split "
                         f"({len(train)} / {len(val)} studies)")
    return sorted(train), sorted(val)


def cpu_model() -> str:
    """The processor's model name (``/proc/cpuinfo``; `platform.processor()` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(device: torch.device, amp_dtype) -> dict:
    """Where a run trained: device and its name, AMP dtype, torch threads, the processor and ATen's
    CPU capability (CPU scores repeat exactly only on the same kind of processor: oneDNN picks
    kernels by instruction set), and the versions of the libraries that decide the numbers."""
    import albumentations
    import timm

    return dict(
        cpu=cpu_model(), cpu_capability=torch.backends.cpu.get_cpu_capability(),
        device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        amp=str(amp_dtype).replace("torch.", "") if amp_dtype else "off",
        threads=torch.get_num_threads(),
        python=platform.python_version(), torch=torch.__version__, timm=timm.__version__,
        albumentations=albumentations.__version__, numpy=np.__version__,
        cuda=torch.version.cuda if device.type == "cuda" else None,
    )


def worker_init(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: seed the worker's Python, NumPy and albumentations generators from
    its torch seed (so runs repeat with the same generator)."""
    info = torch.utils.data.get_worker_info()
    seed = int(info.seed % 2**31)
    np.random.seed(seed)
    random.seed(seed)
    transform = getattr(info.dataset, "transform", None)
    if transform is not None and hasattr(transform, "set_random_seed"):
        transform.set_random_seed(seed)


def read_checkpoint(path) -> dict:
    """The dict a `fit` checkpoint holds, its tensors on the CPU (callers move the model to its
    device, so a device problem is never mistaken for a bad file). Raises ValueError naming the
    file when it is not one (another kind of file, truncated, or not a dict)."""
    import pickle
    import zipfile

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, AttributeError, ImportError) as e:
        raise ValueError(f"{path}: not a spinesweep checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"{path}: not a spinesweep checkpoint (no config and state_dict)")
    return ckpt
