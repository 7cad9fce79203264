"""spinesweep's command line, `optuna-run` (`spinesweep.cli`).

It sits above the three libraries: `trainer/` (the shared trainer), `sweep/` (Optuna + MLflow)
and `dashboards/` (reports read from both); none of them imports it.
"""
