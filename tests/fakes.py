"""`quick_fit`: a stand-in for `trainer.fit.fit` with the same signature and a real `FitResult`,
for tests of what happens *around* training (Optuna's ask/tell and pruning, MLflow logging, the
trial quota across processes, the runs table) without training a network.

It reads the real data folder, splits it with the real folds, and scores real Kaggle-form
predictions with the real metric; only the predictions are made up: every validation row gets
``(1 - a) * training class frequencies + a * its one-hot truth`` with ``a`` growing over the
epochs to a config-dependent skill. So curves fall, configs differ, pruners have something to
compare, and the same config gives the same scores (a reproduce matches exactly). The ``lstm``
head raises, so a study has a failing trial on demand.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from trainer.config import TrainConfig
from trainer.data.cache import data_fingerprint, default_cache_dir
from trainer.data.layout import Layout, parse_row_ids
from trainer.fit import FitResult, confusion_matrices, train_val_split
from trainer.metric import TARGET_COLUMNS, build_solution, class_prior, score_groups

SKILL = {"linear": 0.9, "attention": 0.05}


def skill(cfg: TrainConfig) -> float:
    """How far towards the truth the predictions get by the last epoch (0..1): best for a linear
    head at lr 3e-3, falling off by the log-distance of the lr from it."""
    return SKILL.get(cfg.model.head, 0.5) * math.exp(-abs(math.log10(cfg.optim.lr / 3e-3)))


def quick_fit(cfg: TrainConfig, callbacks=(), progress=None) -> FitResult:
    if cfg.model.head == "lstm":
        raise RuntimeError("quick_fit: the lstm head fails on purpose (a failing trial)")
    t0 = time.perf_counter()
    layout = Layout(Path(cfg.data.data_dir))
    fingerprint = data_fingerprint(layout)
    train_ids, val_ids = train_val_split(layout, cfg, default_cache_dir(cfg.data.cache_dir), fingerprint)
    conditions = cfg.data.conditions
    solution = build_solution(layout, val_ids, conditions)
    labels = layout.labels
    prior = class_prior(labels[labels["study_id"].isin(set(train_ids))], conditions)
    rows = parse_row_ids(solution["row_id"])["condition"].map(prior).tolist()
    base = np.stack(rows)
    truth = solution[list(TARGET_COLUMNS)].to_numpy()

    def frame(a: float) -> pd.DataFrame:
        p = (1 - a) * base + a * truth
        return pd.DataFrame({"row_id": solution["row_id"], **{c: p[:, i] for i, c in enumerate(TARGET_COLUMNS)}})

    prior_score = score_groups(solution, frame(0.0))
    out = Path(cfg.output_dir) if cfg.output_dir else Path(".")
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "checkpoint.pt"
    history, best, stopped, reason = [], None, False, ""
    for epoch in range(1, cfg.optim.epochs + 1):
        oof = frame(skill(cfg) * epoch / cfg.optim.epochs)
        res = score_groups(solution, oof)
        metrics = dict(epoch=epoch, train_loss=res.score * 1.1, val_loss=res.score, score=res.score,
                       **{f"loss_{k}": v for k, v in res.groups.items()}, lr=cfg.optim.lr, seconds=0.001,
                       train_seconds=0.001, data_seconds=0.0)
        history.append(metrics)
        if best is None or res.score < best[1].score:
            best = (epoch, res, oof)
            torch.save({"config": cfg.to_dict(), "epoch": epoch, "quick_fit": True}, checkpoint)
        for cb in callbacks:
            if cb(epoch, dict(metrics)):
                stopped, reason = True, f"stopped by {getattr(cb, '__name__', type(cb).__name__)} after epoch {epoch}"
        if stopped:
            break
    epoch, res, oof = best
    return FitResult(
        config=cfg, history=history, best_epoch=epoch, score=res.score, groups=res.groups,
        prior_score=prior_score.score, prior_groups=prior_score.groups, oof=oof, solution=solution,
        confusion=confusion_matrices(solution, oof, conditions), checkpoint=str(checkpoint),
        environment={"device": "cpu", "device_name": "quick_fit", "amp": "off"}, pretrained_loaded=False,
        augment_pipeline={"quick_fit": True}, data_fingerprint=fingerprint, n_train=len(train_ids),
        n_val=len(val_ids), stopped_early=stopped, stop_reason=reason, seconds=time.perf_counter() - t0)
