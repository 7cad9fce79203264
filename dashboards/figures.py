"""Figure builders: plain data from `dashboards.info` in, plotly figures out (plotly imported
lazily). Each returns None when its data is empty, and the report says so in words instead."""
from __future__ import annotations

from typing import Any

STATE_COLOURS = {"COMPLETE": "#1f77b4", "PRUNED": "#ff7f0e", "FAIL": "#d62728", "RUNNING": "#2ca02c",
                 "WAITING": "#7f7f7f"}
CLASSES = ["normal/mild", "moderate", "severe"]


def _go():
    import plotly.graph_objects as go

    return go


def _layout(fig, title: str, x: str = "", y: str = "", height: int = 420):
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y, height=height, template="plotly_white",
                      margin=dict(l=60, r=20, t=60, b=50))
    return fig


def history(data: dict[str, list], direction: str = "minimize"):
    if not data["number"]:
        return None
    go = _go()
    fig = go.Figure()
    for state in ("COMPLETE", "PRUNED"):
        idx = [i for i, s in enumerate(data["state"]) if s == state]
        if idx:
            label = "complete" if state == "COMPLETE" else "pruned (last reported value)"
            fig.add_trace(go.Scatter(x=[data["number"][i] for i in idx], y=[data["value"][i] for i in idx],
                                     mode="markers", name=label, marker=dict(color=STATE_COLOURS[state], size=9)))
    fig.add_trace(go.Scatter(x=data["number"], y=data["best"], mode="lines", name="best so far",
                             line=dict(color="#2ca02c", shape="hv")))
    return _layout(fig, f"Optimisation history ({direction})", "trial", "score (lower is better)")


def importances(data: dict[str, float]):
    if not data:
        return None
    go = _go()
    names = list(data)[::-1]
    fig = go.Figure(go.Bar(x=[data[n] for n in names], y=names, orientation="h", marker_color="#1f77b4"))
    return _layout(fig, "Parameter importances (Optuna's default evaluator)", "importance", "",
                   height=max(260, 60 + 40 * len(names)))


def parallel(table: dict[str, Any]):
    if len(table["number"]) < 2 or not table["params"]:
        return None
    go = _go()
    dims = []
    for name, col in table["params"].items():
        vals = col["values"]
        if col["categorical"]:
            choices = col["choices"]
            dims.append(dict(label=name, values=[choices.index(str(v)) if v is not None else -1 for v in vals],
                             tickvals=list(range(len(choices))), ticktext=choices))
        else:
            import math

            dims.append(dict(label=name + (" (log10)" if col["log"] else ""),
                             values=[math.log10(v) if col["log"] and v else v for v in vals]))
    dims.append(dict(label="score", values=table["value"]))
    fig = go.Figure(go.Parcoords(line=dict(color=table["value"], colorscale="Viridis_r", showscale=True),
                                 dimensions=dims))
    return _layout(fig, "Parallel coordinates (completed trials; colour = score)")


def slices(table: dict[str, Any]):
    if not table["number"] or not table["params"]:
        return None
    go = _go()
    from plotly.subplots import make_subplots

    names = list(table["params"])
    cols = min(3, len(names))
    rows = (len(names) + cols - 1) // cols
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=names)
    for i, name in enumerate(names):
        col = table["params"][name]
        pairs = [(v, y, n) for v, y, n in zip(col["values"], table["value"], table["number"]) if v is not None]
        r, c = i // cols + 1, i % cols + 1
        fig.add_trace(go.Scatter(x=[str(p[0]) if col["categorical"] else p[0] for p in pairs],
                                 y=[p[1] for p in pairs], mode="markers", showlegend=False,
                                 marker=dict(color=[p[2] for p in pairs], colorscale="Blues", size=8,
                                             line=dict(width=0.5, color="#333")),
                                 text=[f"trial {p[2]}" for p in pairs]), row=r, col=c)
        if col["log"]:
            fig.update_xaxes(type="log", row=r, col=c)
    return _layout(fig, "Slice plots: score against each parameter (colour = trial number)",
                   height=max(320, 300 * rows))


def intermediate(data: list[dict]):
    if not data:
        return None
    go = _go()
    fig = go.Figure()
    for t in data:
        colour = STATE_COLOURS.get(t["state"], "#7f7f7f")
        fig.add_trace(go.Scatter(x=t["steps"], y=t["values"], mode="lines", name=f"trial {t['number']}",
                                 line=dict(color=colour, width=1.5), legendgroup=t["state"]))
        if t["pruned_at"] is not None:
            fig.add_trace(go.Scatter(x=[t["pruned_at"]], y=[t["values"][-1]], mode="markers", showlegend=False,
                                     marker=dict(symbol="x", size=11, color=STATE_COLOURS["PRUNED"]),
                                     hovertext=f"trial {t['number']} pruned at step {t['pruned_at']}"))
    return _layout(fig, "Intermediate values (blue: complete, orange: pruned at the x)", "step (global epoch)",
                   "best validation score so far")


def timeline(data: list[dict]):
    if not data:
        return None
    go = _go()
    import datetime as dt

    fig = go.Figure()
    seen = set()
    for t in data:
        start = dt.datetime.fromisoformat(t["start"])
        fig.add_trace(go.Bar(base=[t["start"]], x=[max(t["seconds"], 0.5) * 1000], y=[t["worker"]], orientation="h",
                             marker_color=STATE_COLOURS.get(t["state"], "#7f7f7f"), name=t["state"].lower(),
                             showlegend=t["state"] not in seen, legendgroup=t["state"],
                             hovertext=f"trial {t['number']} ({t['state'].lower()}, {t['seconds']:.0f} s, "
                                       f"from {start:%H:%M:%S})"))
        seen.add(t["state"])
    fig.update_xaxes(type="date")
    return _layout(fig, "Trial timeline per worker", "time", "worker", height=max(260, 120 + 60 * len(
        {t["worker"] for t in data})))


def learning_curves(data: dict[str, Any], title: str):
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
