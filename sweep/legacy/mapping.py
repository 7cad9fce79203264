"""An entry's settings as `TrainConfig` keys.

Each bullet of an entry is read by small rules (``lr 3-e3`` -> ``optim.lr = 0.003``; ``window
ratio 0.12 instead of 0.15`` -> ``data.window_ratio = 0.12``; an ``add augment`` block -> the
``augment.ops`` list); a line no rule understands is kept verbatim in ``unmapped``, never dropped.
Values written as a change take the new value: ``A instead of B`` -> A, ``from A to B`` -> B.

Settings inherit: an entry starts from its base's resolved settings (``based: expNNN``, or the
entry just before it when it names none: the log was written as a chain of tweaks) and its own
lines override them. Every entry also starts from what held for the whole competition unless the
entry says otherwise (`BASELINE`): all five conditions scored, pretrained ImageNet weights.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from trainer.data.layout import CONDITIONS

from .parse import Entry, Line

BASELINE: dict[str, Any] = {"data.conditions": list(CONDITIONS), "model.pretrained": True}

# the log's augmentation names -> the ops trainer.augment knows (typos included)
AUGMENT_OPS = {
    "horizontalflip": "HorizontalFlip", "horiflip": "HorizontalFlip",
    "verticalflip": "VerticalFlip", "vertflip": "VerticalFlip",
    "randombrightnesscontrast": "RandomBrightnessContrast", "randombrightcontrast": "RandomBrightnessContrast",
    "shiftscalerotate": "ShiftScaleRotate", "blur": "Blur", "noise": "GaussNoise", "gaussnoise": "GaussNoise",
    "distortion": "OpticalDistortion", "croarsedropout": "CoarseDropout", "coarsedropout": "CoarseDropout",
    "dropout": "CoarseDropout", "cutout": "CoarseDropout",
}

_NUM = r"\d+(?:\.\d+)?(?:e-?\d+)?"

# how the log names an op's albumentations 1.x arguments in words, besides their own names
ARGUMENT_WORDS = {
    "CoarseDropout": ((r"(?:cutout |hole |box )?size ratio", ("max_height", "max_width")),
                      (r"number of (?:box|boxes|holes?)", ("max_holes",))),
}


@dataclass
class Mapped:
    """What one entry's own lines say (`map_entry`): TrainConfig keys, the lines no rule understood,
    and two facts about the run itself, None when the entry does not state them: `folds_evaluated`
    (how many folds were trained) and `dataset_version` (the log's dataset version, e.g. ``v7``)."""

    params: dict[str, Any] = field(default_factory=dict)  # TrainConfig keys -> values
    unmapped: list[str] = field(default_factory=list)     # lines kept verbatim
    folds_evaluated: int | None = None                   # "4 folds": every fold was trained
    dataset_version: str | None = None                   # "using datset v7"


def _fix_typos(text: str) -> str:
    return re.sub(r"(\d)-e(\d)", r"\1e-\2", text)  # "3-e3" -> "3e-3"


def new_value(text: str) -> str | None:
    """The value a setting ends with: ``A instead of B`` -> A, ``from A to B`` / ``A to B`` -> B,
    ``reduced to A from B`` -> A, else the first number."""
    t = _fix_typos(text.lower())
    for pattern, group in ((rf"({_NUM})\s+instead of", 1), (rf"to\s+({_NUM})\s+from", 1),
                           (rf"({_NUM})\s+to\s+({_NUM})", 2), (rf"({_NUM})", 1)):
        m = re.search(pattern, t)
        if m:
            return m.group(group)
    return None


def _float(text: str) -> float | None:
    v = new_value(text)
    return float(v) if v is not None else None


def _int(text: str) -> int | None:
    v = new_value(text)
    return int(float(v)) if v is not None else None


def _is_backbone(name: str) -> bool:
    import timm

    return timm.is_model(name)


def _clause(text: str, ancestors: list[str], out: Mapped) -> bool:
    """Map one clause; False when no rule understood it."""
    t = _fix_typos(text.lower().strip())
    axial = any("axial" in a for a in ancestors)
    if "warm" in t:
        if "no warmup" in t or "no warm up" in t:
            out.params["optim.warmup_ratio"] = 0.0
            return True
        m = re.search(rf"\(warm\s*up ratio\s+({_NUM})\)", t)
        v = float(m.group(1)) if m else _float(t)
        if v is not None:
            out.params["optim.warmup_ratio"] = v
            return True
        return False
    rules: list[tuple[str, Any]] = [
        (r"\blr\b(.*)", lambda m: out.params.__setitem__("optim.lr", _float(m.group(1)))),
        (r"change\s+(\d+)\s+to\s+(\d+)\s+epochs?\b", lambda m: out.params.__setitem__("optim.epochs", int(m.group(2)))),
        (r"\bepochs?\b(.*)", lambda m: out.params.__setitem__("optim.epochs", _int(m.group(1)))),
        (r"\b(?:batch size|bs)\b(.*)", lambda m: out.params.__setitem__("optim.batch_size", _int(m.group(1)))),
        (r"\b(?:img|image) size\b(.*)", lambda m: out.params.__setitem__("data.img_size", _int(m.group(1)))),
        (r"window[ _]ratio(?: size)?\b(.*)", lambda m: out.params.__setitem__(
            "data.axial_window_ratio" if axial else "data.window_ratio", _float(m.group(1)))),
        (r"crop to ratio of\s+(.*)", lambda m: out.params.__setitem__("data.window_ratio", _float(m.group(1)))),
        (r"^use (avg|max|gem) pooling$", lambda m: out.params.__setitem__("model.pooling", m.group(1))),
        (r"^full precision training$", lambda m: out.params.__setitem__("amp", False)),
        (rf"^max norm\s+({_NUM})$", lambda m: out.params.__setitem__("optim.grad_clip", float(m.group(1)))),
        (r"^use focal loss$", lambda m: out.params.__setitem__("optim.loss", "focal")),
        (rf"^gamma\s+({_NUM})$", lambda m: out.params.__setitem__("optim.focal_gamma", float(m.group(1)))),
        (rf"^label[_ ]smoothing\s+({_NUM})$", lambda m: out.params.__setitem__("optim.label_smoothing", float(m.group(1)))),
        (r"^validation on fold\s+(\d)$", lambda m: out.params.__setitem__("data.fold", int(m.group(1)))),
        (r"divide by 255", lambda m: out.params.__setitem__("data.normalize", "minmax255")),
        (r"^turn model into\s+(\d+)\s+in_chans$", lambda m: out.params.__setitem__("model.in_chans", int(m.group(1)))),
        (r"^(\d+)\s+(?:lstm|gru|rnn)\s+layers?\b", lambda m: out.params.__setitem__("model.rnn_layers", int(m.group(1)))),
        (r"\bonly\s+(\d+)\s+(?:lstm|gru|rnn)\s+layers?\b", lambda m: out.params.__setitem__("model.rnn_layers", int(m.group(1)))),
        (r"^use only sagittal and remove subarticular$", lambda m: out.params.__setitem__(
            "data.conditions", [c for c in CONDITIONS if "subarticular" not in c])),
        (r"^(?:add\s+)?(\d+)\s+axial t2$", lambda m: out.params.update(
            {"data.axial_slices": int(m.group(1)), "data.conditions": list(CONDITIONS)})),
        # axial back in means subarticular back in (only the axial series shows it)
        (r"^added axial (?:t2$|pick\b)", lambda m: out.params.__setitem__("data.conditions", list(CONDITIONS))),
        (r"^(?:exp\d+\s+)?(?:but\s+)?(\d+)\s*folds?$", lambda m: setattr(out, "folds_evaluated", int(m.group(1)))),
        (r"^using da?ta?set\s+(v\d+)$", lambda m: setattr(out, "dataset_version", m.group(1))),
    ]
    for pattern, apply in rules:
        m = re.search(pattern, t)
        if m:
            apply(m)
            if any(v is None for v in out.params.values()):  # a rule matched but found no value
                out.params = {k: v for k, v in out.params.items() if v is not None}
                return False
            return True
    m = re.match(r"^use\s+([a-z][\w]*(?:\.[\w]+)?)$", t)
    if m and _is_backbone(m.group(1)):
        out.params["model.backbone"] = m.group(1)
        return True
    return False


def _number(text: str):
    return int(text) if re.fullmatch(r"\d+", text) else float(text)


def op_arguments(op: str, text: str) -> dict[str, Any] | None:
    """The albumentations 1.x arguments one setting line under an op states, e.g. ``var_limit
    0.1 to 0.2`` -> ``{"var_limit": (0.1, 0.2)}`` (a range: the argument takes a pair),
    ``increase cutout size ratio 0.2 from 0.1 and reduce number of box to 2 instead 4`` ->
    ``{"max_height": 0.2, "max_width": 0.2, "max_holes": 2}`` (a change: the new value). None
    when a clause names no argument of `op` or states no value."""
    from trainer.augment import V1_ARGUMENTS, accepted_arguments

    names = set(accepted_arguments(op)) | {a for (o, a) in V1_ARGUMENTS if o == op}
    found: dict[str, Any] = {}
    for clause in re.split(r"\s+and\s+", _fix_typos(text.lower().strip())):
        clause = clause.strip("* ")
        targets, rest = None, clause
        for word in sorted(names, key=len, reverse=True):
            m = re.search(rf"\b{re.escape(word)}\b(.*)", clause)
            if m:
                targets, rest = (word,), m.group(1)
                break
        for pattern, args in ARGUMENT_WORDS.get(op, ()) if targets is None else ():
            m = re.search(pattern + r"(.*)", clause)
            if m:
                targets, rest = args, m.group(1)
                break
        if targets is None:
            return None
        pair = re.fullmatch(rf"\s*\(?({_NUM})\s*(?:,|to|-)\s*({_NUM})\)?\s*", rest)
        if pair:  # "0.1 to 0.2", "(10, 50)": a range, albumentations 1.x's pair
            value: Any = (_number(pair.group(1)), _number(pair.group(2)))
        else:
            v = new_value(rest)
            if v is None:
                return None
            value = _number(v)
        found.update({t: value for t in targets})
    return found or None


def _line(line: Line, ancestors: list[str], out: Mapped) -> None:
    """Map a line and its sub-bullets; blocks (augment, heads, slices) read their children."""
    t = line.text.lower().strip()
    if re.match(r"^add augment(ation)?s?$", t):
        from trainer.augment import translate_v1

        ops: dict[str, dict] = {}
        for child in line.children:
            c = child.text.lower().strip()
            key = re.sub(r"[^a-z]", "", c.split("(")[0])
            if c.startswith("removed ") or c.startswith("no "):
                continue  # the op is gone (listed for the reader)
            op = AUGMENT_OPS.get(key)
            if op is not None:
                ops.setdefault(op, {})
            else:
                out.unmapped.append(f"augment: {child.text}")
            for grand, _ in child.walk():
                if grand is child:
                    continue
                # the log was written against albumentations 1.x: its arguments, in today's names
                stated = op_arguments(op, grand.text) if op else None
                args, kept = translate_v1(op, stated) if stated else ({}, {})
                if stated and not kept:
                    ops[op].update({k: list(v) if isinstance(v, tuple) else v for k, v in args.items()})
                else:
                    out.unmapped.append(f"augment {child.text}: {grand.text}")
        out.params["augment.ops"] = [{"name": op, **args} for op, args in ops.items()]
        return
    if re.search(r"\buse 5 head separately\b|\bonly 1 head\b", t):
        texts = [c.text.lower() for c, _ in line.walk() if c is not line]
        rnn = "gru" if any("gru head" in x for x in texts) else "lstm" if any("lstm" in x for x in texts) else None
        attention = any(re.search(r"\battention\b", x) for x in texts)
        if t.startswith("not use"):
            out.unmapped.append(line.text)
        head = (f"{rnn}_attention" if rnn == "lstm" and attention else rnn) if rnn else (
            "attention" if attention else "multihead")
        out.params["model.head"] = head
        if "5 head" in t:  # one head per condition: the five conditions
            out.params["data.conditions"] = list(CONDITIONS)
        for child, _ in line.walk():
            if child is line:
                continue
            c = child.text.lower()
            if re.search(r"extracted features from (lstm|gru) head|^attention head$|^added attention$"
                         r"|then take mean of seq as logits", c):
                continue  # read above
            if not _clause(child.text, [t], out):
                out.unmapped.append(f"head: {child.text}")
        return
    m = re.match(r"^(\d+) slices$", t)
    if m:
        out.unmapped.append(f"{line.text} (the total; per plane below where stated)")
        for child in line.children:
            c = child.text.lower().strip()
            m2 = re.match(r"^each (\d+) from sagittal t1 and t2$", c)
            if m2:
                out.params["data.sag_t2_slices"] = int(m2.group(1))
                out.unmapped.append(f"{child.text} (sagittal T1: the log counts per series, "
                                    "data.sag_t1_slices counts per side)")
            elif not _clause(child.text, [t], out):
                out.unmapped.append(child.text)
            for grand, _ in child.walk():
                if grand is not child and not _clause(grand.text, [t, c], out):
                    out.unmapped.append(f"{child.text}: {grand.text}")
        return
    clauses = re.split(r"\s+and\s+(?=warm|epoch|lr\b)", line.text)
    understood = [_clause(c, ancestors, out) for c in clauses]
    if not all(understood):
        out.unmapped.append(line.text)
    for child in line.children:
        _line(child, ancestors + [t], out)


def map_entry(entry: Entry) -> Mapped:
    """The entry's own settings (not inherited) as TrainConfig keys plus what stays verbatim."""
    out = Mapped()
    for line in entry.settings:
        _line(line, [], out)
    return out


@dataclass
class Resolved:
    """One entry with its settings inherited (`resolve`): `own` is what its own lines say; `params`
    is `BASELINE`, then the base entry's resolved params, then its own; `inherits_from` is None
    for the first entry or a `based:` that names no earlier entry."""

    entry: Entry
    own: Mapped
    params: dict[str, Any]          # inherited + own, on top of BASELINE
    inherits_from: str | None       # the entry whose settings this one starts from
    implicit_base: bool             # True when the log names no base (the previous entry is used)


def resolve(entries: list[Entry]) -> list[Resolved]:
    """Every entry with its settings resolved through `based:` (the latest earlier entry of that
    number) or, when it names no base, the entry just before it."""
    out: list[Resolved] = []
    latest: dict[str, Resolved] = {}
    for i, e in enumerate(entries):
        own = map_entry(e)
        base, implicit = None, False
        if e.based_on:
            base = latest.get(e.based_on)
            if base is None:  # a forward reference or a missing number: nothing to inherit
                own.unmapped.append(f"based: {e.based_on} (no such earlier entry)")
        elif out:
            base, implicit = out[-1], True
        params = dict(BASELINE)
        if base is not None:
            params.update(base.params)
        params.update(own.params)
        r = Resolved(entry=e, own=own, params=params, inherits_from=base.entry.name if base else None,
                     implicit_base=implicit)
        out.append(r)
        latest[e.name.split("-")[0]] = r  # `based: exp164` means the latest exp164
    return out
