"""Merge every benchmark's latest results (bench/results/<name>.json) into bench/results.json
and one table, bench/results.md (quoted in the README). Run by bench/run_all."""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, machine, met_cell, ratio_cell  # noqa: E402

ORDER = ("data", "trainer", "study", "scale", "search")


def main() -> int:
    parts = {}
    for name in ORDER:
        path = RESULTS / f"{name}.json"
        if not path.exists():
            print(f"bench/collect: {path} missing: run bench/{name}.py", file=sys.stderr)
            return 1
        parts[name] = json.loads(path.read_text())
    rows = [dict(r, benchmark=name) for name, p in parts.items() for r in p["rows"]]
    judged = [r for r in rows if r.get("met") is not None]  # rows with a goal that were measured
    out = dict(machine=machine(), benchmarks={n: p["machine"] for n, p in parts.items()}, rows=rows,
               met=sum(bool(r["met"]) for r in judged), total=len(judged))
    (ROOT / "bench" / "results.json").write_text(json.dumps(out, indent=2))
    m = out["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory']}, {m['cuda'] or 'no GPU'}; python {m['python']}, "
             f"torch {m['torch']}. {out['met']} of {out['total']} goals met.", "",
             "| benchmark | measure | baseline | spinesweep | ratio | goal | met | measured |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['benchmark']} | {r['what']} | {r['baseline']} | {r['value']} | {ratio_cell(r)} | "
                     f"{r['goal']} | {met_cell(r)} | {r['when']} |")
    (ROOT / "bench" / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
