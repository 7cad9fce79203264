"""Figure builders. The six standard ones come from `optuna.visualization` (`optuna_figure`); the
project's own, for what Optuna cannot know (learning curves, confusion matrices, reliability of the
OOF probabilities, the study against the imported manual log), take plain data from
`dashboards.info`. Each returns None when its data is empty, and the report says so in words."""
from __future__ import annotations

from typing import Any

CLASSES = ["normal/mild", "moderate", "severe"]


def _go():
    import plotly.graph_objects as go

    return go


def _layout(fig, title: str, x: str = "", y: str = "", height: int = 420):
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y, height=height, template="plotly_white",
                      margin=dict(l=60, r=20, t=60, b=50))
    return fig


# the figures Optuna draws itself, on the study without its imported trials
OPTUNA_FIGURES = {
    "history": ("plot_optimization_history", "Optimisation history"),
    "importances": ("plot_param_importances", "Parameter importances (Optuna's default evaluator)"),
    "parallel": ("plot_parallel_coordinate", "Parallel coordinates (completed trials)"),
    "slices": ("plot_slice", "Slice plots: score against each parameter"),
    "intermediate": ("plot_intermediate_values", "Intermediate values: the best validation score so far per epoch"),
    "timeline": ("plot_timeline", "Trial timeline"),
}


def optuna_figure(name: str, study):
    """One of `optuna.visualization`'s figures, or None when the study has nothing to draw (no
    completed trial, a single one for importances, no reported value...)."""
    import warnings

    import optuna
    import optuna.visualization as vis

    fn, title = OPTUNA_FIGURES[name]
    states = [t.state for t in study.get_trials(deepcopy=False)]
    done = states.count(optuna.trial.TrialState.COMPLETE)
    if not states or (name in ("history", "parallel", "slices") and not done) or (name == "importances" and done < 2):
        return None
    if name == "intermediate" and not any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
        return None
    try:
        with warnings.catch_warnings():  # experimental-API and small-study chatter
            warnings.simplefilter("ignore")
            fig = getattr(vis, fn)(study)
    except (RuntimeError, ValueError, ZeroDivisionError):  # e.g. importances when nothing varies
        return None
    if not fig.data:
        return None
    fig.update_layout(title=title, template="plotly_white", height=max(420, fig.layout.height or 0))  # axes: Optuna's
    return fig


def learning_curves(data: dict[str, Any], title: str):
    """A run's loss (train and validation) and validation score by epoch, a line per fold, from
    `info.learning_curves` (``{"folds": [{"fold", "epoch", "train_loss", "val_loss", "score"}]}``);
    None without folds."""
    if not data.get("folds"):
        return None
    go = _go()
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=["loss", "validation score"])
    for f in data["folds"]:
        tag = f" fold {f['fold']}" if f["fold"] else ""
        fig.add_trace(go.Scatter(x=f["epoch"], y=f["train_loss"], name=f"train loss{tag}", mode="lines+markers"), 1, 1)
        fig.add_trace(go.Scatter(x=f["epoch"], y=f["val_loss"], name=f"val loss{tag}", mode="lines+markers"), 1, 1)
        fig.add_trace(go.Scatter(x=f["epoch"], y=f["score"], name=f"score{tag}", mode="lines+markers"), 1, 2)
    fig.update_xaxes(title_text="epoch")
    return _layout(fig, title)


def confusion(data: dict[str, list[list[int]]]):
    """A heatmap per condition of `info.confusion`'s counts (rows truth, columns prediction; normal/mild,
    moderate, severe); None when there are none."""
    if not data:
        return None
    go = _go()
    from plotly.subplots import make_subplots

    names = list(data)
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=[n.replace("_", " ") for n in names],
                        horizontal_spacing=0.04)
    for i, name in enumerate(names):
        m = data[name]
        fig.add_trace(go.Heatmap(z=m, x=CLASSES, y=CLASSES, colorscale="Blues", showscale=False,
                                 text=m, texttemplate="%{text}"), 1, i + 1)
        fig.update_yaxes(autorange="reversed", row=1, col=i + 1)
    fig.update_xaxes(title_text="predicted")
    fig.update_yaxes(title_text="truth", row=1, col=1)
    return _layout(fig, "Confusion matrices of the best trial's OOF predictions (argmax)", height=360)


def calibration(data: dict[str, list]):
    """A reliability diagram of `info.calibration`'s bins (mean predicted probability against
    observed frequency, markers sized by the bin's count) beside the diagonal; None without predictions."""
    if not data["predicted"]:
        return None
    go = _go()
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfect", line=dict(dash="dash", color="#999")))
    fig.add_trace(go.Scatter(x=data["predicted"], y=data["observed"], mode="lines+markers", name="best trial",
                             text=[f"{n} predictions" for n in data["count"]],
                             marker=dict(size=[6 + 14 * (n / max(data["count"])) ** 0.5 for n in data["count"]])))
    fig.update_xaxes(range=[0, 1])
    fig.update_yaxes(range=[0, 1])
    return _layout(fig, "Reliability of the best trial's OOF probabilities (all classes, 10 bins)",
                   "mean predicted probability", "observed frequency")


def against_legacy(data: dict[str, Any], study_name: str):
    """Box plots of the manual log's fold-0 CV scores and the study's completed values
    (`info.against_legacy`); None unless both have some."""
    if not data["legacy"] or not data["study"]:
        return None
    go = _go()
    fig = go.Figure()
    fig.add_trace(go.Box(y=[d["value"] for d in data["legacy"]], name="manual log (fold-0 CV)", boxpoints="all",
                         jitter=0.4, text=[d["entry"] for d in data["legacy"]], marker_color="#8c564b"))
    fig.add_trace(go.Box(y=[d["value"] for d in data["study"]], name=f"study {study_name}", boxpoints="all",
                         jitter=0.4, text=[f"trial {d['number']}" for d in data["study"]], marker_color="#1f77b4"))
    return _layout(fig, "The study against the imported manual log (scores on their own data: the log's are "
                        "real-data CVs)", "", "score (lower is better)")


def condition_losses(data: list[dict[str, Any]]):
    """Per condition group, the validation loss by epoch of each of the best trials."""
    if not data:
        return None
    go = _go()
    from plotly.subplots import make_subplots

    groups = sorted({g for d in data for g in d["losses"]})
    fig = make_subplots(rows=1, cols=len(groups), subplot_titles=[f"{g} loss" for g in groups],
                        horizontal_spacing=0.05)
    for d in data:
        for i, g in enumerate(groups):
            if g in d["losses"]:
                fig.add_trace(go.Scatter(x=d["epoch"], y=d["losses"][g], mode="lines+markers", legendgroup=str(d["trial"]),
                                         name=f"trial {d['trial']} ({d['value']:.4f})", showlegend=i == 0), 1, i + 1)
    fig.update_xaxes(title_text="epoch")
    return _layout(fig, "Validation loss per condition group, the best trials")
