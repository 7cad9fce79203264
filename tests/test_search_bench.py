"""bench/search.py's replay on a synthetic grid: the bookkeeping (epochs to a target, regret at a
budget, pruned trials costing the epochs they ran) and a short replay of two strategies."""
from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import search  # noqa: E402
from sweep.space import load_space  # noqa: E402


def synthetic_table(seed: int = 0):
    space = load_space("demo")
    rng = random.Random(seed)
    table = {}
    for c in search.grid_configs(space):
        key = (c["model.head"], c["data.window_ratio"], c["optim.lr"], c["model.dropout"])
        base = 0.5 + rng.random() * 0.4
        table[key] = [base + 0.4 / e for e in range(1, 11)]
    axes = {k: v for k, v in search.grid_axes(space).items() if k != "model.head"}
    return table, axes


def test_the_grid_covers_the_space_as_the_issue_asks():
    axes = search.grid_axes(load_space("demo"))
    assert axes["model.head"] == ["linear", "attention", "lstm"]
    assert axes["data.window_ratio"] == [0.1, 0.15, 0.2]
    assert len(axes["optim.lr"]) == 5 and axes["optim.lr"][0] == 5e-4 and axes["optim.lr"][-1] == 6e-3
    assert axes["model.dropout"] == [0.0, 0.2, 0.4]
    assert len(search.grid_configs(load_space("demo"))) == 135


def test_summary_of_hand_made_traces():
    runs = [{"sampler": "s", "pruner": "p", "seed": 0, "horizon": 0.5, "trace": [(10, 1.5), (20, 1.2), (25, 1.01)]},
            {"sampler": "s", "pruner": "p", "seed": 1, "horizon": 0.5, "trace": [(10, 1.1), (40, 1.1)]},
            {"sampler": "s", "pruner": "p", "seed": 2, "horizon": 0.5, "trace": [(5, math.inf), (15, 1.0)]}]
    out = search.summarise(runs, grid_best=1.0, total=100)["s+p"]
    assert out["reached"] == 2  # within 2% of 1.0: seeds 0 (at 25 epochs) and 2 (at 15)
    assert out["epochs_to_within"] == {"q25": 25, "median": 25, "q75": math.inf}  # pessimistic middles
    assert out["regret"]["10%"]["median"] == pytest.approx(0.5)  # 1.5, 1.1 and nothing yet (inf) at 10 epochs
    assert out["regret"]["25%"]["median"] == pytest.approx(0.01)  # 1.01, 1.1, 1.0


def test_a_replay_spends_the_horizon_and_finds_what_the_table_holds():
    table, axes = synthetic_table()
    total = len(table) * 10
    best = min(min(c) for c in table.values())
    for pruner in ("none", "space"):
        r = search.replay_one(("tpe", pruner, 0, table, axes, total))
        spent = [s for s, _ in r["trace"]]
        assert spent == sorted(spent) and spent[-1] >= total * search.HORIZON > spent[-2]
        steps = [b - a for a, b in zip([0] + spent, spent)]
        assert all(1 <= s <= 10 for s in steps) and (pruner == "none") == all(s == 10 for s in steps)
        found = r["trace"][-1][1]
        assert best <= found < best * 1.2 and found in {min(c) for c in table.values()}
