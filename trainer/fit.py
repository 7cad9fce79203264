"""`fit(cfg, callbacks) -> FitResult`: the one training loop every trial, `optuna-run train` and
the tests call the same way. It imports neither optuna nor mlflow.

Callbacks are plain callables ``callback(epoch, metrics) -> bool | None``, called after every
epoch's validation; returning True stops the run (it still returns a FitResult, with
`stopped_early`); raising propagates after the trainer has released its memory and files.
"""
from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .augment import build_augment, describe
from .config import TrainConfig
from .data.cache import data_fingerprint, default_cache_dir
from .data.crops import CropSpec, lacking_conditions
from .data.dataset import SpineDataset
from .data.samples import SampleSource, fold_coordinates
from .data.volumes import VolumeStore, cache_budget
from .data.layout import TARGET_COLUMNS, Layout, parse_row_ids
from .metric import build_solution, class_prior, predictions_frame, score_groups
from .models import build_model
# the loop's shared parts live in `training`; imported here too, as before (trainer.fit.resolve_device...)
from .training import (EMA, Callback, FitResult, environment, loader_workers, lr_lambda, optimizer_step,  # noqa: F401
                       read_checkpoint,
                       resolve_device, seed_everything, train_val_split, worker_init)


def score_oof(cfg: TrainConfig, solution: pd.DataFrame, oof: pd.DataFrame):
    """The validation score of `cfg.task`'s out-of-fold rows (a `metric.ScoreResult`): the host
    metric for the classifier, the point error for the localiser; so the OOF rows of several
    folds are scored together by whoever joins them, without knowing the task."""
    if cfg.task == "localize":
        from .points.metrics import score_points

        return score_points(solution, oof, cfg.localizer.score)
    return score_groups(solution, oof)


def weighted_loss(logits, target, mask, class_weights, focal_gamma: float = 0.0, smoothing: float = 0.0):
    """Weighted soft-label cross entropy (optionally focal), the training criterion.

    logits [B, C, 3]; target [B, C, 3] soft labels; mask [B, C] (0 where the label is empty).
    Rows weigh by their true class (1/2/4 by default), normalised by the total weight, as the
    metric does, so the loss and the score agree on what matters."""
    row_w = (target * class_weights).sum(-1) * mask
    if smoothing:
        target = target * (1 - smoothing) + smoothing / 3
    logp = F.log_softmax(logits.float(), dim=-1)
    loss = -(target * logp).sum(-1)
    if focal_gamma:
        p_true = (target * logp.exp()).sum(-1)
        loss = loss * (1 - p_true).clamp_min(0).pow(focal_gamma)
    return (loss * row_w).sum() / row_w.sum().clamp_min(1e-8)


def _one_hot(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mask = (target >= 0).float()
    return F.one_hot(target.clamp_min(0), 3).float() * mask[..., None], mask


def prior_predictions(layout: Layout, train_ids, val_ds: SpineDataset) -> pd.DataFrame:
    """Every validation row gets its condition's class frequencies in the training fold."""
    labels = layout.labels
    prior = class_prior(labels[labels["study_id"].isin(set(train_ids))], val_ds.conditions)
    probs = np.tile(np.asarray([prior[c] for c in val_ds.conditions])[None], (len(val_ds.items), 1, 1))
    ids, lvls = zip(*val_ds.items)
    return predictions_frame(ids, lvls, probs, val_ds.conditions)


def confusion_matrices(solution: pd.DataFrame, oof: pd.DataFrame, conditions) -> dict:
    """Per condition, scikit-learn's confusion matrix of the argmax grades (rows = truth)."""
    from sklearn.metrics import confusion_matrix

    merged = solution.merge(oof, on="row_id", suffixes=("", "_pred"))
    truth = merged[list(TARGET_COLUMNS)].to_numpy().argmax(1)
    pred = merged[[c + "_pred" for c in TARGET_COLUMNS]].to_numpy().argmax(1)
    condition = parse_row_ids(merged["row_id"])["condition"].to_numpy()
    return {cond: confusion_matrix(truth[condition == cond], pred[condition == cond], labels=[0, 1, 2]).tolist()
            for cond in conditions}


@dataclass
class FoldData:
    """A fold's studies, crop spec, sample source and datasets (what `fold_datasets` builds)."""

    train_ids: list[int]
    val_ids: list[int]
    spec: CropSpec
    source: SampleSource
    augment: object  # the training augmentation pipeline
    train_ds: SpineDataset
    val_ds: SpineDataset


def fold_datasets(cfg: TrainConfig, layout: Layout, cache_root: Path, fingerprint: str) -> FoldData:
    """The training and validation datasets of fold `cfg.data.fold`, their series decoded and
    crops planned. Training crops are cut around the labelled points (with the configured jitter
    and augmentation); validation crops around the labelled points too, or with
    ``data.val_points: oof`` around the out-of-fold points of ``data.val_points_file``
    (`data.samples.fold_coordinates`), as a test study's are: every validation score, val_loss
    and OOF row then measures the classifier on a localiser's points.

    Raises:
        ConfigError: ``oof`` without ``data.val_points_file``.
        ValPointsError: ``oof`` with a points file that cannot be read or lacks validation studies.
    """
    cfg.data.check_val_points()
    train_ids, val_ids = train_val_split(layout, cfg, cache_root, fingerprint)
    spec = CropSpec.from_config(cfg.data)
    coords = (fold_coordinates(layout, val_ids, cfg.data.val_points_file, cfg.data.fold)
              if cfg.data.val_points == "oof" else None)
    source = SampleSource(layout, spec, VolumeStore(cache_root, cache_budget(cfg.data.cache_budget_gb)),
                          coordinates=coords)
    # cold series are decoded by as many processes as this trial has cores (its torch threads:
    # a study's worker gets its share); cached ones only get their crops planned
    source.prepare(train_ids + val_ids, jobs=torch.get_num_threads())
    augment = build_augment(cfg.augment, seed=cfg.seed)
    train_ds = SpineDataset(source, train_ids, cfg.data.conditions, cfg.data.normalize, transform=augment,
                            crop_shift=cfg.augment.crop_shift, crop_scale=cfg.augment.crop_scale)
    val_ds = SpineDataset(source, val_ids, cfg.data.conditions, cfg.data.normalize)
    return FoldData(train_ids, val_ids, spec, source, augment, train_ds, val_ds)


def fit(cfg: TrainConfig, callbacks: Iterable[Callback] = (), progress: Callable | None = None) -> FitResult:
    """Train on every fold but `cfg.data.fold`, validate on it each epoch; see the module doc.

    Training crops are cut around the labelled points; validation crops too, unless
    ``data.val_points`` is ``oof``: then around the points of ``data.val_points_file``, a
    localiser's out-of-fold points (`data.samples.fold_coordinates`, which raises
    `ValPointsError` before any training when the file lacks a validation study).

    `progress(stage, done, total)` is an optional hook for progress bars. `cfg.task` picks the
    model family: ``classify`` (this loop) or ``localize`` (`points.fit.fit_localizer`)."""
    if cfg.task == "localize":
        from .points.fit import fit_localizer

        return fit_localizer(cfg, callbacks, progress)
    t_start = time.perf_counter()
    callbacks = list(callbacks)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    amp_dtype = None
    if cfg.amp and device.type == "cuda":
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    layout = Layout(Path(cfg.data.data_dir))
    cache_root = default_cache_dir(cfg.data.cache_dir)
    fingerprint = data_fingerprint(layout)
    data = fold_datasets(cfg, layout, cache_root, fingerprint)
    train_ids, val_ids, spec, augment = data.train_ids, data.val_ids, data.spec, data.augment
    train_ds, val_ds = data.train_ds, data.val_ds
    conditions = cfg.data.conditions
    g = torch.Generator().manual_seed(cfg.seed)
    workers = loader_workers(cfg.num_workers, device)
    loader_kw = dict(num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    train_dl = DataLoader(train_ds, batch_size=cfg.optim.batch_size, shuffle=True, drop_last=len(train_ds) > cfg.optim.batch_size,
                          generator=g, worker_init_fn=worker_init, **loader_kw)
    val_dl = DataLoader(val_ds, batch_size=cfg.optim.batch_size * 2, shuffle=False, **loader_kw)

    solution = build_solution(layout, val_ids, conditions)
    prior = score_groups(solution, prior_predictions(layout, train_ids, val_ds))
    # the training fold's grade frequencies: what a validation sample gets for a condition whose
    # crop could not be built (never the model's answer to blank pixels), and what the checkpoint
    # carries for prediction on test studies
    train_labels = layout.labels[layout.labels["study_id"].isin(set(train_ids))]
    label_prior = np.stack([class_prior(train_labels, conditions)[c] for c in conditions])  # (C, 3)
    block_names = [b for b, _ in spec.blocks()]

    model = build_model(cfg.model, spec.n_slices, len(conditions)).to(device)
    ema = EMA(model, cfg.optim.ema) if cfg.optim.ema else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    total_steps = max(1, cfg.optim.epochs * len(train_dl))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    class_w = torch.tensor(cfg.optim.class_weights, device=device)
    out_dir = Path(cfg.output_dir) if cfg.output_dir else Path(tempfile.mkdtemp(prefix="spinesweep-run-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / "checkpoint.pt"

    history: list[dict] = []
    best = dict(epoch=0, value=math.inf, oof=None)
    stopped, reason = False, ""
    try:
        for epoch in range(1, cfg.optim.epochs + 1):
            t0 = time.perf_counter()
            train_loss, data_s = _train_epoch(model, train_dl, optimizer, scheduler, scaler, ema, cfg, device,
                                              amp_dtype, class_w, epoch, progress)
            t_train = time.perf_counter() - t0
            eval_model = ema.model if ema else model
            probs, val_loss = _evaluate(eval_model, val_dl, device, amp_dtype, class_w, block_names, label_prior,
                                        conditions)
            oof = predictions_frame(*zip(*val_ds.items), probs, conditions)
            res = score_groups(solution, oof)
            metrics = dict(epoch=epoch, train_loss=train_loss, val_loss=val_loss, score=res.score,
                           **{f"loss_{k}": v for k, v in res.groups.items()},
                           lr=optimizer.param_groups[0]["lr"], seconds=time.perf_counter() - t0,
                           train_seconds=t_train, data_seconds=data_s)
            history.append(metrics)
            value = res.score if cfg.select_by == "score" else val_loss
            if value < best["value"]:
                best.update(epoch=epoch, value=value, oof=oof, groups=res.groups, score=res.score)
                _save_checkpoint(ckpt_path, eval_model, cfg, spec, epoch, metrics, label_prior)
            for cb in callbacks:
                if cb(epoch, dict(metrics)):
                    stopped, reason = True, f"stopped by {getattr(cb, '__name__', type(cb).__name__)} after epoch {epoch}"
            if stopped:
                break
        return FitResult(
            config=cfg, history=history, best_epoch=best["epoch"], score=best["score"], groups=best["groups"],
            prior_score=prior.score, prior_groups=prior.groups, oof=best["oof"], solution=solution,
            confusion=confusion_matrices(solution, best["oof"], conditions), checkpoint=str(ckpt_path),
            environment=dict(environment(device, amp_dtype), loader_workers=workers), pretrained_loaded=model.pretrained_loaded,
            augment_pipeline=describe(augment), data_fingerprint=fingerprint,
            n_train=len(train_ds), n_val=len(val_ds), stopped_early=stopped, stop_reason=reason,
            seconds=time.perf_counter() - t_start,
        )
    finally:
        # release memory and worker processes whether the run ended, stopped or raised
        del model, optimizer, scheduler, ema, train_dl, val_dl
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _train_epoch(model, loader, optimizer, scheduler, scaler, ema, cfg, device, amp_dtype, class_w, epoch, progress):
    model.train()
    total, n, data_s = 0.0, 0, 0.0
    mix_rng = np.random.default_rng([cfg.seed, epoch])
    t_wait = time.perf_counter()
    for step, batch in enumerate(loader):
        data_s += time.perf_counter() - t_wait
        if progress and step == 0:  # the first batch is here: training starts
            progress("train", 0, len(loader))
        x = batch["image"].to(device, non_blocking=True)
        target, mask = _one_hot(batch["target"].to(device))
        if cfg.augment.mixup_p and mix_rng.random() < cfg.augment.mixup_p and len(x) > 1:
            lam = float(mix_rng.beta(cfg.augment.mixup_alpha or 0.4, cfg.augment.mixup_alpha or 0.4))
            perm = torch.from_numpy(mix_rng.permutation(len(x))).to(device)
            x = lam * x + (1 - lam) * x[perm]
            target = lam * target + (1 - lam) * target[perm]
            mask = mask * mask[perm]
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
        loss = weighted_loss(logits, target, mask, class_w, cfg.optim.focal_gamma if cfg.optim.loss == "focal" else 0.0,
                             cfg.optim.label_smoothing)
        optimizer_step(loss, model, optimizer, scheduler, scaler, ema, cfg.optim.grad_clip, epoch, step)
        total += loss.item() * len(x)
        n += len(x)
        if progress:
            progress("train", step + 1, len(loader))
        t_wait = time.perf_counter()
    return total / max(n, 1), data_s


@torch.no_grad()
def _evaluate(model, loader, device, amp_dtype, class_w, block_names, label_prior, conditions):
    """(probabilities [N, C, 3], weighted validation loss). A condition whose block is absent
    (`present` off: its series, slice or point missing) gets `label_prior` (C, 3), as on test
    studies, and is scored as such."""
    model.eval()
    probs, loss_sum, weight_sum = [], 0.0, 0.0
    prior = torch.as_tensor(label_prior, dtype=torch.float32, device=device)
    for batch in loader:
        x = batch["image"].to(device, non_blocking=True)
        target, mask = _one_hot(batch["target"].to(device))
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
        logits = logits.float()
        lacking = torch.from_numpy(lacking_conditions(block_names, batch["present"].numpy(), conditions))
        if lacking.any():  # log-probabilities are logits too: softmax gives them back
            logits = torch.where(lacking.to(device)[..., None], prior.log().expand_as(logits),
                                 torch.log_softmax(logits, -1))
        p = torch.softmax(logits, -1)
        w = ((target * class_w).sum(-1) * mask).sum().item()
        loss_sum += weighted_loss(logits, target, mask, class_w).item() * w
        weight_sum += w
        probs.append(p.cpu().numpy())
    return np.concatenate(probs), loss_sum / max(weight_sum, 1e-8)


def _save_checkpoint(path: Path, model, cfg: TrainConfig, spec: CropSpec, epoch: int, metrics: dict,
                     label_prior: np.ndarray | None = None) -> None:
    """A self-describing checkpoint: config, model arguments, state, label names and the training
    fold's grade frequencies per condition (`label_prior`, (conditions, 3): what prediction gives
    a condition whose crop cannot be built)."""
    import timm

    module = model.module if hasattr(model, "module") else model  # AveragedModel wraps the net
    tmp = path.with_suffix(".tmp")
    payload = dict(
        config=cfg.to_dict(), n_slices=spec.n_slices, conditions=list(cfg.data.conditions),
        label_names=list(TARGET_COLUMNS), blocks=spec.blocks(), epoch=epoch, metrics=metrics,
        state_dict=module.state_dict(), versions=dict(torch=torch.__version__, timm=timm.__version__),
        label_prior=None if label_prior is None else np.asarray(label_prior, dtype=np.float64).tolist(),
    )
    try:
        torch.save(payload, tmp)
        tmp.replace(path)
    except (OSError, RuntimeError) as e:  # disk full: no partial checkpoint is left behind
        tmp.unlink(missing_ok=True)
        raise OSError(f"{path}: checkpoint could not be written ({e})") from e


def load_checkpoint(path: str | Path, device: str = "cpu"):
    """(model, TrainConfig, checkpoint dict) from a checkpoint written by `fit`; raises ValueError
    naming the file when it is not one (`training.read_checkpoint`)."""
    import dataclasses

    ckpt = read_checkpoint(path)
    cfg = TrainConfig.from_dict(ckpt["config"])
    # the weights come from the state dict: never download pretrained ones to overwrite
    model = build_model(dataclasses.replace(cfg.model, pretrained=False), ckpt["n_slices"], len(ckpt["conditions"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval(), cfg, ckpt
