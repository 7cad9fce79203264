"""The manual experiment log (exp001-exp190) as structured entries.

The log is a markdown diary: dated sections (``# 8.8``), free notes, and experiment entries::

    - **exp097**
        - based: exp090
        - use tf_efficientnetv2_s.in21k_ft_in1k
        - *adjusted idx by + 1 to argmin*          <- italics: what changed against the base
        - [RESULT] fold0 CV: 0.4187, LB: 0.49
            - valid loss: 0.3570
        - [RESULT] fold0 re CV: 0.4313, LB: 0.47
        - [KEEP]

The parser keeps everything: bullet lines before the first result are the entry's settings (a
tree: a line's sub-bullets are its children), lines after it are notes. It copes with what the
real file does: lower-case ``[result]``, ``folds0`` for ``fold0``, empty values, suffixes such as
``(VL)`` or ``0.46S``, a setting line that lost its indentation, repeated entry numbers.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from trainer.errors import UserError
YEAR = 2024  # the competition ran from May to October 2024; the log's sections are `# M.D`

_SECTION = re.compile(r"^#\s*(\d{1,2})\.(\d{1,2})\s*$")
_ENTRY = re.compile(r"^(\s*)-\s+\*\*(exp\d+(?:-\d+)?)\*\*\s*(.*)$", re.I)
_BULLET = re.compile(r"^(\s*)-\s?(.*)$")
_BASED = re.compile(r"^based\s*:?\s*(exp\d+)\b\s*(.*)$", re.I)
_RESULT = re.compile(r"^\[(result(?:-re)?)\]\s*(.*)$", re.I)
_KEEP = re.compile(r"^\[keep(\?)?\]\s*(.*)$", re.I)
_NUMBER = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(.*)$")
_DATASET_FROM = re.compile(r"^from\s+(exp\d+)\b.*?\(?\b(v\d+)\b\)?", re.I)


@dataclass
class Line:
    """One bullet of an entry: its text (italics removed), whether it was in italics (a change
    against the base), its 1-based line number in the file, and its sub-bullets."""

    text: str
    lineno: int
    changed: bool = False
    children: list["Line"] = field(default_factory=list)

    def walk(self, depth: int = 0):
        """Yield ``(line, depth)`` for this line and every sub-bullet below it, depth first in file
        order; this line has `depth`, its children ``depth + 1``."""
        yield self, depth
        for c in self.children:
            yield from c.walk(depth + 1)


@dataclass
class Result:
    """One ``[RESULT]`` line. ``scope`` is ``fold`` (with ``fold``) or ``oof`` (``n_folds``);
    ``rerun`` counts re-runs (``fold0 re1``, ``[RESULT-RE]``); ``selection`` is ``vl`` (picked by
    valid loss) or ``ll`` (by log loss) where the line says so."""

    text: str
    lineno: int
    scope: str
    fold: int | None = None
    n_folds: int | None = None
    cv: float | None = None
    lb: float | None = None
    rerun: int = 0
    selection: str | None = None
    note: str = ""
    fold_details: dict[int, dict[str, float]] = field(default_factory=dict)  # fold -> {cv, vl}
    valid_loss: float | None = None


@dataclass
class Entry:
    """One experiment of the log: its settings (the bullet tree before the first result), its
    ``[RESULT]`` lines, keep mark and notes. ``lineno`` is the 1-based line of its ``- **expNNN**`` bullet,
    ``end_lineno`` its last non-blank line; ``based_on`` is the ``based: expNNN`` entry, lower case."""

    name: str               # exp097; a repeated number gets a suffix: exp164-2
    number: int
    date: str | None        # 2024-08-28, from the section heading above it
    lineno: int
    end_lineno: int
    based_on: str | None = None
    settings: list[Line] = field(default_factory=list)
    results: list[Result] = field(default_factory=list)
    keep: str | None = None  # "yes" for [KEEP], "maybe" for [KEEP?]
    notes: list[str] = field(default_factory=list)
    dataset_version: str | None = None  # from the section notes ("from exp038 using v5")

    @property
    def changed(self) -> list[str]:
        """The texts of the setting lines (at any depth) written in italics: what changed against the base."""
        return [line.text for top in self.settings for line, _ in top.walk() if line.changed]


class LogFormatError(UserError):
    """The file does not look like the experiment log; the message names the file and line."""


def _strip_italics(text: str) -> tuple[str, bool]:
    """``*text*`` -> (text, True); partial italics (``CV: 0.41 *diff here*``) count as changed too."""
    t = text.strip()
    if len(t) > 2 and t.startswith("*") and t.endswith("*") and not t.startswith("**"):
        return t[1:-1].strip(), True
    if re.search(r"(?<!\*)\*[^*\s][^*]*\*(?!\*)", t):
        return re.sub(r"(?<!\*)\*([^*\s][^*]*)\*(?!\*)", r"\1", t).strip(), True
    return t, False


def _number(text: str) -> tuple[float | None, str]:
    m = _NUMBER.match(text)
    if not m:
        return None, text.strip()
    return float(m.group(1)), m.group(2).strip()


def parse_result(text: str, lineno: int, tag: str = "result") -> Result:
    """``fold0 CV: 0.5168, LB:`` / ``4 folds oof (valid loss) CV: 0.4444, LB: 0.44`` / ..."""
    head, _, rest = text.partition("CV:") if "CV:" in text else text.lower().partition("cv:")
    cv_text, _, lb_text = rest.partition("LB:") if "LB:" in rest else rest.lower().partition("lb:")
    cv, cv_note = _number(cv_text.rstrip().rstrip(","))
    lb, lb_note = _number(lb_text)
    head_l = head.lower().strip()
    r = Result(text=text.strip(), lineno=lineno, scope="fold", cv=cv, lb=lb)
    m = re.match(r"^(\d+)\s+folds?\b", head_l)
    if m:
        r.scope, r.n_folds = "oof", int(m.group(1))
    else:
        m = re.match(r"^folds?\s*(\d+)", head_l)
        r.fold = int(m.group(1)) if m else 0
    m = re.search(r"\bre(\d*)\b", head_l)
    if m:
        r.rerun = int(m.group(1) or 1)
    if tag.lower() == "result-re":
        r.rerun = max(r.rerun, 1)
    if "valid loss" in head_l:
        r.selection = "vl"
    elif "log loss" in head_l:
        r.selection = "ll"
    # suffixes after the LB value: "(VL)", "(LL)", "S (picked valid loss)", "(better than exp090)"
    note = " ".join(s for s in (cv_note, lb_note) if s).strip()
    if re.fullmatch(r"\(?vl\)?", note, re.I) or "picked valid loss" in note.lower():
        r.selection = r.selection or "vl"
    elif re.fullmatch(r"\(?ll\)?", note, re.I):
        r.selection = r.selection or "ll"
    r.note = note
    return r


def _attach_detail(result: Result, text: str) -> bool:
    """Sub-bullets of a result: ``fold0 VL: 0.3417, CV: 0.4313`` or ``valid loss: 0.3570``."""
    m = re.match(r"^fold\s*(\d+)\s+VL:\s*([\d.]+)\s*,\s*CV:\s*([\d.]+)", text, re.I)
    if m:
        result.fold_details[int(m.group(1))] = {"vl": float(m.group(2)), "cv": float(m.group(3))}
        return True
    m = re.match(r"^valid[ _]loss:\s*([\d.]+)", text, re.I)
    if m:
        result.valid_loss = float(m.group(1))
        return True
    return False


def _bullets(lines: list[tuple[int, str]]) -> list[tuple[int, int, str]]:
    """(lineno, indent, text) per bullet; a non-bullet line continues the previous bullet."""
    out: list[list] = []
    for lineno, raw in lines:
        if not raw.strip():
            continue
        m = _BULLET.match(raw.expandtabs(4))
        if m:
            out.append([lineno, len(m.group(1)), m.group(2).rstrip()])
        elif out:
            out[-1][2] += " " + raw.strip()
    return [tuple(b) for b in out]


def _tree(bullets: list[tuple[int, int, str]], base_indent: int) -> list[Line]:
    roots: list[Line] = []
    stack: list[tuple[int, Line]] = []  # (indent, line)
    for lineno, indent, raw in bullets:
        text, changed = _strip_italics(raw)
        line = Line(text=text, lineno=lineno, changed=changed)
        # a line that lost its indentation inside an entry (exp025's "- lr 3e-3") is a sibling
        indent = max(indent, base_indent)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        (stack[-1][1].children if stack else roots).append(line)
        stack.append((indent, line))
    return roots


def _build_entry(name: str, number: int, date: str | None, lineno: int,
                 body: list[tuple[int, str]]) -> Entry:
    bullets = _bullets(body)
    base_indent = bullets[0][1] if bullets else 4
    roots = _tree(bullets, base_indent)
    entry = Entry(name=name, number=number, date=date, lineno=lineno,
                  end_lineno=max([lineno] + [n for n, raw in body if raw.strip()]))
    seen_result = False
    for line in roots:
        m_res = _RESULT.match(line.text)
        m_keep = _KEEP.match(line.text)
        m_based = _BASED.match(line.text)
        if m_res:
            seen_result = True
            result = parse_result(m_res.group(2), line.lineno, m_res.group(1))
            for child, _ in line.walk():
                if child is not line and not _attach_detail(result, child.text):
                    entry.notes.append(child.text)
            entry.results.append(result)
        elif m_keep:
            entry.keep = "maybe" if m_keep.group(1) else "yes"
            if m_keep.group(2):
                entry.notes.append(m_keep.group(2))
        elif m_based and not seen_result:
            entry.based_on = m_based.group(1).lower()
            # its sub-bullets (e.g. "*4 folds*") are settings of this entry
            entry.settings.extend(line.children)
            if m_based.group(2).strip():
                entry.settings.append(Line(m_based.group(2).strip(), line.lineno, line.changed))
        elif seen_result:
            entry.notes.extend(child.text for child, _ in line.walk())
        else:
            entry.settings.append(line)
    return entry


def parse_log(path: str | Path) -> list[Entry]:
    """Every experiment entry of the log, in file order. Repeated numbers are kept apart:
    the second ``exp164`` is named ``exp164-2``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LogFormatError(f"{path}: cannot read the log ({e})") from None
    lines = text.splitlines()
    entries: list[Entry] = []
    counts: dict[str, int] = {}
    date: str | None = None
    dataset_from: list[tuple[int, str]] = []  # (first exp number, version)
    i = 0
    while i < len(lines):
        raw = lines[i]
        m_sec = _SECTION.match(raw)
        if m_sec:
            date = f"{YEAR}-{int(m_sec.group(1)):02d}-{int(m_sec.group(2)):02d}"
            i += 1
            continue
        m_ds = _DATASET_FROM.match(raw.strip().lstrip("-").strip())
        if m_ds and not raw.startswith(" "):
            dataset_from.append((int(m_ds.group(1)[3:]), m_ds.group(2).lower()))
        m = _ENTRY.match(raw)
        if not (m and len(m.group(1).expandtabs(4)) == 0):
            i += 1
            continue
        name = m.group(2).lower()  # the log itself names one repeat: exp144-2
        counts[name] = counts.get(name, 0) + 1
        run_name = name if counts[name] == 1 else f"{name}-{counts[name]}"
        while run_name in counts and run_name != name:
            counts[name] += 1
            run_name = f"{name}-{counts[name]}"
        counts.setdefault(run_name, 1)
        start = i
        i += 1
        body: list[tuple[int, str]] = []
        blank_run = 0
        while i < len(lines):
            raw = lines[i]
            if _SECTION.match(raw) or _ENTRY.match(raw) and not raw[:1].isspace():
                break
            if not raw.strip():
                blank_run += 1
            else:
                top_level = not raw[:1].isspace()
                # a top-level line ends the entry unless it directly follows an entry line (a lost indent)
                if top_level and (blank_run > 0 or not body):
                    break
                blank_run = 0
            body.append((i + 1, raw))
            i += 1
        entry = _build_entry(run_name, int(name[3:].split("-")[0]), date, start + 1, body)
        entries.append(entry)
    for e in entries:
        versions = [v for first, v in dataset_from if e.number >= first]
        e.dataset_version = versions[-1] if versions else "v1"
    if not entries:
        raise LogFormatError(f"{path}: no experiment entries (lines like '- **exp001**')")
    return entries
