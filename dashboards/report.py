"""One self-contained HTML report per study: plotly.js inlined once, so it opens offline.

Each figure sits in a ``<section data-figure=NAME>``; a section whose data is empty says why in
words instead. A small script records any JavaScript error in ``#report-errors`` (the headless
browser test reads it).
"""
from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Any

import optuna

from sweep.tracking import Tracker
from sweep.trials import best_trial, own_trials, without_legacy

from . import figures, info

_ERRORS_JS = """<script>
window.__reportErrors = [];
window.addEventListener('error', function (e) {
  window.__reportErrors.push(String(e.message));
  var el = document.getElementById('report-errors');
  if (el) { el.textContent = window.__reportErrors.join('\\n'); el.style.display = 'block'; }
});
</script>"""

_CSS = """<style>
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1200px; color: #222; }
h1 { margin-bottom: 4px; } .meta { color: #555; margin-top: 0; }
section { border-top: 1px solid #ddd; padding: 8px 0 16px; }
.empty { color: #777; font-style: italic; }
#report-errors { display: none; color: #b00; white-space: pre-wrap; }
table { border-collapse: collapse; } td, th { padding: 2px 10px; text-align: left; }
</style>"""


def collect(study: optuna.Study, tracker: Tracker | None = None, legacy_experiment: str = "legacy") -> dict[str, Any]:
    """What the project's own figures show, as plain data (from the best trial's MLflow run)."""
    data: dict[str, Any] = {
        "best_run": info.best_run_id(study),
        "curves": {"folds": []}, "confusion": {}, "calibration": {"predicted": [], "observed": [], "count": []},
        "legacy": {"legacy": [], "study": []}, "losses": [],
    }
    if tracker is not None:
        run_id = data["best_run"]
        if run_id:
            data["curves"] = info.learning_curves(tracker, run_id)
            data["confusion"] = info.confusion(tracker, run_id)
            oof, sol = info.run_frames(tracker, run_id)
            if oof is not None and sol is not None:
                data["calibration"] = info.calibration(oof, sol)
        data["legacy"] = info.against_legacy(study, tracker, legacy_experiment)
        data["losses"] = info.condition_losses(study, tracker)
    data["trials"] = info.trial_rows(study, tracker)
    return data


def _optuna(name: str):
    return lambda d, s: figures.optuna_figure(name, without_legacy(s))


SECTIONS = [  # name, builder, why it can be empty
    ("history", _optuna("history"), "no completed trial yet"),
    ("importances", _optuna("importances"), "needs at least two completed trials with a parameter that varies"),
    ("parallel", _optuna("parallel"), "no completed trial yet"),
    ("slices", _optuna("slices"), "no completed trial yet"),
    ("intermediate", _optuna("intermediate"), "no trial reported a value yet"),
    ("timeline", _optuna("timeline"), "no trial started yet"),
    ("curves", lambda d, s: figures.learning_curves(d["curves"], f"Learning curves of the best trial "
                                                                 f"(MLflow run {d['best_run']})"),
     "the best trial's run has no history.csv (or no MLflow store was given)"),
    ("losses", lambda d, s: figures.condition_losses(d["losses"]),
     "no completed trial with a history.csv (or no MLflow store was given)"),
    ("confusion", lambda d, s: figures.confusion(d["confusion"]), "the best trial's run has no confusion matrices"),
    ("calibration", lambda d, s: figures.calibration(d["calibration"]),
     "the best trial's run has no oof.csv and solution.csv"),
    ("legacy", lambda d, s: figures.against_legacy(d["legacy"], s.study_name),
     "no imported manual log (optuna-run import-log) or no completed trial"),
]


UI_URL = "http://127.0.0.1:5000"  # where `optuna-run ui` serves the MLflow UI by default


def trial_table(rows: list[dict[str, Any]], ui_url: str = UI_URL) -> str:
    """Every trial: state, the value Optuna holds (the same `score` MLflow shows), what promotion
    found over every fold, and its run id as a link into the MLflow UI."""
    if not rows:
        return ""
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    body = []
    for r in rows:
        run = html.escape(str(r["run_id"] or "-"))
        if r["run_id"] and r["experiment_id"]:
            run = (f"<a href='{html.escape(ui_url)}/#/experiments/{html.escape(str(r['experiment_id']))}/runs/"
                   f"{run}' target='_blank'>{run}</a>")
        value = "" if r["value"] is None else f" data-score='{r['value']!r}'"
        body.append(f"<tr data-trial='{r['trial']}' data-state='{r['state']}'{value}><td>{r['trial']}</td>"
                    f"<td>{r['state'].lower()}</td><td>{fmt(r['value'])}</td><td>{fmt(r['promoted_score'])}</td>"
                    f"<td>{html.escape(str(r.get('val_points') or '-'))}</td>"
                    f"<td>{run}</td><td>{html.escape(r['error'][:80])}</td></tr>")
    return ("<section data-table='trials'><h3>Trials</h3><p class='meta'>score: the value Optuna holds "
            "(a pruned trial's best score when it was stopped), the same as MLflow's <code>score</code>; "
            "promoted: its score over every fold after <code>optuna-run promote</code>; validation points: the "
            "points its validation crops were cut around (<code>data.val_points</code>: labelled, or oof: a "
            "localiser's out-of-fold points, as the leaderboard scores); run ids open the "
            f"MLflow UI at {html.escape(ui_url)} (<code>optuna-run ui</code>)</p><table id='trials'><tr><th>trial</th>"
            "<th>state</th><th>score</th><th>promoted (all folds)</th><th>validation points</th><th>MLflow run</th>"
            "<th>error</th></tr>"
            + "".join(body) + "</table></section>")


def write_report(study: optuna.Study, out: str | Path, tracker: Tracker | None = None,
                 tracking_uri: str = "", ui_url: str = UI_URL) -> dict[str, Any]:
    """Write the HTML report; returns {figures: [...], empty: {name: why}, path}."""
    data = collect(study, tracker)
    trials = study.get_trials(deepcopy=False)
    own = own_trials(study)
    counts = {s.name.lower(): sum(t.state == s for t in own) for s in optuna.trial.TrialState}
    parts, built, empty = [], [], {}
    first = True
    for name, build, why in SECTIONS:
        fig = build(data, study)
        if fig is None:
            empty[name] = why
            parts.append(f'<section data-figure="{name}" data-empty="1"><h3>{name}</h3>'
                         f'<p class="empty">{html.escape(why)}</p></section>')
            continue
        built.append(name)
        div = fig.to_html(full_html=False, include_plotlyjs="inline" if first else False,
                          div_id=f"fig-{name}", config={"displaylogo": False})
        first = False
        parts.append(f'<section data-figure="{name}">{div}</section>')
    best = ""
    b = best_trial(study)
    if b is not None:
        rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(f'{v:.4g}' if isinstance(v, float) else str(v))}"
                       f"</td></tr>" for k, v in b.params.items())
        best = (f"<p>Best trial <b>{b.number}</b>: score <b>{b.value:.4f}</b>, MLflow run "
                f"<code>{html.escape(str(b.user_attrs.get('mlflow_run_id')))}</code></p><table>{rows}</table>")
    legacy_n = len(trials) - len(own)
    meta = ", ".join(f"{v} {k}" for k, v in counts.items() if v) + (f", {legacy_n} imported from the manual log"
                                                                      if legacy_n else "")
    doc = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>spinesweep: {html.escape(study.study_name)}"
           f"</title>{_ERRORS_JS}{_CSS}</head><body><h1>Study {html.escape(study.study_name)}</h1>"
           f"<p class='meta'>{html.escape(meta)} &middot; written {time.strftime('%Y-%m-%d %H:%M')}"
           f"{' &middot; MLflow ' + html.escape(tracking_uri) if tracking_uri else ''}</p>"
           f"<pre id='report-errors'></pre>{best}{''.join(parts)}{trial_table(data['trials'], ui_url)}</body></html>")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(doc, encoding="utf-8")
    return {"path": str(out), "figures": built, "empty": empty}
