"""`fit_localizer`: the localiser's training loop, called by `trainer.fit.fit` for
``task: localize`` with the same config, callbacks, folds and checkpoint conventions as the
classifier, and the same `FitResult`.

Each epoch trains on slices of the training folds' labelled series (`data.SliceDataset`), then
runs every slice of the validation studies' series as a test study would be searched, decodes
their points (`locate.decode_study`) and scores them in patient space (`metrics.score_points`):
the score is `localizer.score` (p90 or median point error, mm, every point; lower is better),
the groups hold the median and p90 per plane, the share of points on the right level and the
slice error. The prior score is the mean-position guess (`infer.LevelPrior`, fitted on the
training folds; axial points: the guessed canal point carried to the nearest axial slice, as the
crop builder's fallback does) on the same points.
"""
from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Iterable

import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..config import TrainConfig
from ..data.cache import data_fingerprint, default_cache_dir
from ..data.geometry import nearest_slice, pixel_to_patient
from ..data.layout import Layout
from ..data.volumes import SeriesRef, VolumeStore, cache_budget
from ..training import (EMA, Callback, FitResult, environment, loader_workers, lr_lambda, optimizer_step,
                        resolve_device, seed_everything, train_val_split, worker_init)
from .data import SliceDataset, groups_of, slice_frame
from .locate import SeriesMaps, decode_study
from .metrics import COORD_COLUMNS, competition_form, score_points, with_patient_positions
from .model import CHANNELS, build_keypoint_model, save_checkpoint
from .prior import LevelPrior

POSITIVE_WEIGHT = 10.0  # a heatmap cell weighs 1 + this x its target in the loss: points are few


def heatmap_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Binary cross entropy of heatmap logits ``[B, C, H, W]`` against Gaussian targets of the
    same shape, cells weighted by ``1 + POSITIVE_WEIGHT x target``, channels by ``mask [B, C]``."""
    w = (1 + POSITIVE_WEIGHT * target) * mask[:, :, None, None]
    loss = F.binary_cross_entropy_with_logits(logits.float(), target, weight=w, reduction="sum")
    return loss / (mask.sum() * target.shape[-1] * target.shape[-2]).clamp_min(1.0)



def prior_points(layout: Layout, train_ids, study_ids, load_volume, cache_root: Path) -> pd.DataFrame:
    """The mean-position guess for `study_ids` (LevelPrior fitted on `train_ids`), with each
    level's recess points at the guessed canal point carried to the nearest Axial T2 slice."""
    prior = LevelPrior.fit(layout, cache_root, study_ids=train_ids)
    frames = []
    for sid in study_ids:
        series = layout.series_of(sid)
        rows = prior.coordinates(sid, series, lambda s, sid=sid: load_volume(sid, s))
        extra = []
        if series["Axial T2"]:
            try:
                ax = load_volume(sid, series["Axial T2"][0])
            except Exception:
                ax = None
            for r in rows[rows["condition"] == "spinal_canal_stenosis"].itertuples(index=False) if ax is not None else ():
                sag = load_volume(sid, int(r.series_id))
                p = pixel_to_patient(sag, sag.index_of_instance(int(r.instance_number)), r.x, r.y)
                j, x, y, _ = nearest_slice(ax, p)
                for c in ("left_subarticular_stenosis", "right_subarticular_stenosis"):
                    extra.append(dict(study_id=sid, series_id=series["Axial T2"][0],
                                      instance_number=int(ax.instance_numbers[j]), condition=c, level=r.level, x=x, y=y))
        frames.append(pd.concat([rows, pd.DataFrame(extra, columns=list(COORD_COLUMNS))], ignore_index=True))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(COORD_COLUMNS))


def fit_localizer(cfg: TrainConfig, callbacks: Iterable[Callback] = (), progress=None) -> FitResult:
    """Train the keypoint model on every fold but `cfg.data.fold`, validate on it each epoch;
    see the module doc. Returns a `FitResult` whose `oof` holds the best epoch's points (submission
    spelling, with patient-space columns), `solution` the labelled ones, `tables` the points in
    the competition's form (``oof_coordinates.csv``)."""
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
    train_ids, val_ids = train_val_split(layout, cfg, cache_root, fingerprint)
    store = VolumeStore(cache_root, cache_budget(cfg.data.cache_budget_gb))
    groups = groups_of(cfg.data.conditions)
    refs = [SeriesRef(s, i, layout.series_dir(s, i)) for s in train_ids + val_ids
            for d, ids in layout.series_of(s).items() for i in ids]
    store.prepare(refs, jobs=torch.get_num_threads())

    model = build_keypoint_model(cfg.model, cfg.localizer.stride).to(device)
    lc = cfg.localizer
    train_ds = SliceDataset(layout, store, train_ids, groups, lc, cfg.model.in_chans, model.stride, train=True, seed=cfg.seed)
    val_ds = SliceDataset(layout, store, val_ids, groups, lc, cfg.model.in_chans, model.stride, train=False)
    workers = loader_workers(cfg.num_workers, device)
    loader_kw = dict(num_workers=workers, pin_memory=device.type == "cuda")
    g = torch.Generator().manual_seed(cfg.seed)
    val_dl = DataLoader(val_ds, batch_size=cfg.optim.batch_size * 2, shuffle=False, **loader_kw)

    def load_volume(study_id, series_id):
        return store.open(SeriesRef(int(study_id), int(series_id), layout.series_dir(study_id, series_id)))

    conditions = tuple(cfg.data.conditions)
    labelled = layout.coordinates
    labelled = labelled[labelled["study_id"].isin(set(val_ids)) & labelled["condition"].isin(conditions)]
    solution = with_patient_positions(labelled.reset_index(drop=True), load_volume)
    prior = score_points(solution, with_patient_positions(
        prior_points(layout, train_ids, val_ids, load_volume, cache_root), load_volume), lc.score)

    ema = EMA(model, cfg.optim.ema) if cfg.optim.ema else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    steps_per_epoch = max(1, len(train_ds) // cfg.optim.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, cfg.optim.epochs * steps_per_epoch))
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    out_dir = Path(cfg.output_dir) if cfg.output_dir else Path(tempfile.mkdtemp(prefix="spinesweep-run-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / "checkpoint.pt"

    history: list[dict] = []
    best = dict(epoch=0, value=math.inf, oof=None, groups={}, score=math.inf)
    stopped, reason = False, ""
    try:
        for epoch in range(1, cfg.optim.epochs + 1):
            t0 = time.perf_counter()
            train_ds.set_epoch(epoch)
            train_dl = DataLoader(train_ds, batch_size=cfg.optim.batch_size, shuffle=True, drop_last=True,
                                  generator=g, worker_init_fn=worker_init, **loader_kw)
            train_loss = _train_epoch(model, train_dl, optimizer, scheduler, scaler, ema, cfg, device, amp_dtype,
                                      epoch, progress)
            t_train = time.perf_counter() - t0
            eval_model = ema.model if ema else model
            oof, val_loss = _validate(eval_model, val_dl, val_ds, model.stride, device, amp_dtype, conditions, load_volume)
            res = score_points(solution, oof, lc.score)
            metrics = dict(epoch=epoch, train_loss=train_loss, val_loss=val_loss, score=res.score,
                           **{k: v for k, v in res.groups.items() if math.isfinite(v)},
                           lr=optimizer.param_groups[0]["lr"], seconds=time.perf_counter() - t0, train_seconds=t_train)
            history.append(metrics)
            value = res.score if cfg.select_by == "score" else val_loss
            if value < best["value"] or best["oof"] is None:
                best.update(epoch=epoch, value=value, oof=oof, groups=res.groups, score=res.score)
                save_checkpoint(ckpt_path, eval_model, cfg, epoch, metrics)
            for cb in callbacks:
                if cb(epoch, dict(metrics)):
                    stopped, reason = True, f"stopped by {getattr(cb, '__name__', type(cb).__name__)} after epoch {epoch}"
            if stopped:
                break
        return FitResult(
            config=cfg, history=history, best_epoch=best["epoch"], score=best["score"], groups=best["groups"],
            prior_score=prior.score, prior_groups=prior.groups, oof=best["oof"], solution=solution, confusion={},
            checkpoint=str(ckpt_path), environment=dict(environment(device, amp_dtype), loader_workers=workers),
            pretrained_loaded=model.pretrained_loaded,
            augment_pipeline=dict(localizer_affine=lc.affine, negatives=lc.negatives),
            data_fingerprint=fingerprint, n_train=len(train_ds.all_items), n_val=len(val_ds),
            stopped_early=stopped, stop_reason=reason, seconds=time.perf_counter() - t_start,
            tables={"oof_coordinates.csv": competition_form(best["oof"])},
        )
    finally:
        del model, optimizer, scheduler, ema
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _train_epoch(model, loader, optimizer, scheduler, scaler, ema, cfg, device, amp_dtype, epoch, progress) -> float:
    model.train()
    total, n = 0.0, 0
    for step, batch in enumerate(loader):
        x = batch["image"].to(device, non_blocking=True)
        target, mask = batch["heatmap"].to(device), batch["mask"].to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
        loss = heatmap_loss(logits, target, mask)
        optimizer_step(loss, model, optimizer, scheduler, scaler, ema, cfg.optim.grad_clip, epoch, step)
        total += loss.item() * len(x)
        n += len(x)
        if progress:
            progress("train", step + 1, len(loader))
    return total / max(n, 1)


@torch.no_grad()
def _validate(model, loader, ds: SliceDataset, stride, device, amp_dtype, conditions, load_volume):
    """(points of every validation study with patient-space columns, heatmap loss)."""
    model.eval()
    loss_sum, n = 0.0, 0
    maps: dict[tuple[int, int], SeriesMaps] = {}
    for batch in loader:
        x = batch["image"].to(device, non_blocking=True)
        target, mask = batch["heatmap"].to(device), batch["mask"].to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x).float()
        if mask.sum() > 0:
            loss_sum += heatmap_loss(logits, target, mask).item() * len(x)
            n += len(x)
        probs = torch.sigmoid(logits).cpu().numpy()
        for k, (sid, series_id, idx, group) in enumerate(zip(batch["study_id"].tolist(), batch["series_id"].tolist(),
                                                            batch["index"].tolist(), batch["group"])):
            key = (sid, series_id)
            if key not in maps:
                maps[key] = SeriesMaps(group, series_id, ds.volume(sid, series_id))
            m = maps[key]
            m.indices.append(idx)
            m.frames.append(slice_frame(m.volume, idx, ds.cfg.img_size, group))
            m.probs.append(probs[k][list(CHANNELS[group])])
    per_study: dict[int, list[SeriesMaps]] = {}
    for (sid, _), m in maps.items():
        per_study.setdefault(sid, []).append(m)
    frames = [decode_study(sid, ms, stride, conditions) for sid, ms in sorted(per_study.items())]
    oof = pd.concat(frames, ignore_index=True) if frames else decode_study(0, [], stride, conditions)
    return oof, loss_sum / max(n, 1)
