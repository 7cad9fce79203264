"""Trainer benchmark: training samples per second of `fit` against a minimal bare PyTorch loop on
the same model, dataset, batches and device, measured alternately in one run; and the
data-loading share of a training step.

    .venv/bin/python bench/trainer.py [--work DIR] [--epochs N]

Writes bench/results/trainer.json and bench/results/trainer.md.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from bench.common import write  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.data.cache import data_fingerprint, default_cache_dir  # noqa: E402
from trainer.data.crops import CropSpec  # noqa: E402
from trainer.data.dataset import SpineDataset  # noqa: E402
from trainer.data.layout import Layout  # noqa: E402
from trainer.data.samples import SampleSource  # noqa: E402
from trainer.data.volumes import VolumeStore  # noqa: E402
from trainer.fit import fit, train_val_split  # noqa: E402
from trainer.models import build_model  # noqa: E402

CONFIG = dict(model=dict(backbone="resnet10t", pretrained=False, head="lstm", rnn_hidden=32),
              optim=dict(batch_size=16, lr=1e-3, grad_clip=1.0), augment=dict(preset="none"),
              data=dict(img_size=64))


def bare_loop(cfg: TrainConfig, epochs: int) -> float:
    """Training samples per second of the plainest loop over the same data and model."""
    torch.manual_seed(cfg.seed)
    layout = Layout(Path(cfg.data.data_dir))
    cache = default_cache_dir(cfg.data.cache_dir)
    train_ids, _ = train_val_split(layout, cfg, cache, data_fingerprint(layout))
    spec = CropSpec.from_config(cfg.data)
    store = SampleSource(layout, spec, VolumeStore(cache))
    store.prepare(train_ids)
    ds = SpineDataset(store, train_ids, cfg.data.conditions, cfg.data.normalize)
    dl = DataLoader(ds, batch_size=cfg.optim.batch_size, shuffle=True, drop_last=True)
    model = build_model(cfg.model, spec.n_slices, len(cfg.data.conditions))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    model.train()
    n, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in dl:
            logits = model(batch["image"])
            loss = F.cross_entropy(logits.flatten(0, 1), batch["target"].flatten(), ignore_index=-1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            n += len(batch["image"])
    return n / (time.perf_counter() - t0)


def fit_rate(cfg: TrainConfig, epochs: int) -> tuple[float, float, float]:
    """(training samples/s, data-loading share of training time, end-to-end seconds per epoch)."""
    r = fit(cfg.with_overrides({"optim.epochs": epochs}))
    train_s = sum(h["train_seconds"] for h in r.history)
    data_s = sum(h["data_seconds"] for h in r.history)
    per_epoch = (r.n_train // cfg.optim.batch_size) * cfg.optim.batch_size
    return per_epoch * epochs / train_s, data_s / train_s, sum(h["seconds"] for h in r.history) / epochs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=None)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="spinesweep-bench-"))
    data = work / "phantom50"
    if not (data / "train.csv").exists():
        from trainer.data.phantom import make_phantom

        make_phantom(data, studies=50, test_studies=0, seed=0, jobs=2)
    cfg = TrainConfig.from_dict(CONFIG).with_overrides({"data.data_dir": str(data), "output_dir": str(work / "run")})
    fit_rate(cfg, 1)  # warm caches and allocator for both sides
    bare, ours, shares, epoch_s = [], [], [], []
    for _ in range(args.repeats):  # alternate, keep the best of each
        bare.append(bare_loop(cfg, args.epochs))
        rate, share, per_epoch = fit_rate(cfg, args.epochs)
        ours.append(rate)
        shares.append(share)
        epoch_s.append(per_epoch)
    b, o = max(bare), max(ours)
    share = min(shares)
    rows = [
        dict(what="training samples/s, fit vs bare PyTorch loop (resnet10t, 64 px, CPU)", baseline=f"{b:.1f}",
             value=f"{o:.1f}", ratio=o / b, goal=">= 0.9x", met=o / b >= 0.9),
    ]
    write("trainer", rows, extra=dict(data_loading_share=share, fit_seconds_per_epoch=min(epoch_s),
                                      bare=bare, fit=ours))
    print(f"data loading: {share:.1%} of fit's training time")


if __name__ == "__main__":
    main()
