"""Shared helpers of the benchmarks: the machine's description and result writing."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    import torch

    try:
        import psutil

        mem = f"{psutil.virtual_memory().total / 2**30:.0f} GiB"
    except Exception:
        mem = "?"
    return dict(
        cpu=platform.processor() or platform.machine(),
        cores=os.cpu_count(),
        memory=mem,
        python=platform.python_version(),
        torch=torch.__version__,
        cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        when=time.strftime("%Y-%m-%d %H:%M"),
    )


def write(name: str, rows: list[dict], extra: dict | None = None) -> Path:
    """Write ``results/<name>.json`` and ``results/<name>.md`` (the table the README quotes).
    Each row: what, baseline, value, ratio, goal, met. Rows of an earlier run that this run did not
    measure (a partial run, `--only`) are kept, each with the time it was measured."""
    RESULTS.mkdir(exist_ok=True)
    now = machine()
    rows = [dict(r, when=now["when"]) for r in rows]
    path = RESULTS / f"{name}.json"
    if path.exists():
        old = json.loads(path.read_text())
        fresh = {r["what"] for r in rows}
        kept = [dict(r, when=r.get("when", old["machine"]["when"])) for r in old.get("rows", []) if r["what"] not in fresh]
        rows = rows + kept
        extra = {**{k: v for k, v in old.items() if k not in ("benchmark", "machine", "rows")}, **(extra or {})}
    payload = dict(benchmark=name, machine=now, rows=rows, **(extra or {}))
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2))
    m = payload["machine"]
    lines = [f"Machine: {m['cores']} cores, {m['memory']}, {m['cuda'] or 'CPU only'}; "
             f"python {m['python']}, torch {m['torch']}; {m['when']}.", "",
             "| measure | baseline | spinesweep | ratio | goal | met | measured |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['what']} | {r['baseline']} | {r['value']} | {ratio_cell(r)} | {r['goal']} | "
                     f"{met_cell(r)} | {r['when']} |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return RESULTS / f"{name}.json"


def ratio_cell(row: dict) -> str:
    return "-" if row.get("ratio") is None else f"{row['ratio']:.2f}x"


def met_cell(row: dict) -> str:
    """yes / NO, or "-" for a row without a goal or not measured (no GPU)."""
    return "-" if row.get("met") is None else ("yes" if row["met"] else "NO")
