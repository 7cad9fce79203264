"""Headless Chromium: render a page and report what each figure drew and any JavaScript error
(the dashboard test), or take a screenshot (the README's images)."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--enable-unsafe-swiftshader", "--hide-scrollbars",
         "--disable-dev-shm-usage", "--no-first-run", "--user-data-dir=/tmp/spinesweep-chromium"]


def chromium() -> str | None:
    """The path of a Chromium or Chrome executable on PATH (``chromium``, ``chromium-browser``,
    ``google-chrome``, in that order), or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def render(url: str, budget_ms: int = 10000, timeout: float = 120) -> dict:
    """Load `url`, let its scripts run for `budget_ms` of virtual time, and return
    {figures: {name: svg count}, empty: [names], errors: [js errors from the page and console],
    dom_chars: length of the rendered DOM}. Raises FileNotFoundError when Chromium is not installed."""
    exe = chromium()
    if exe is None:
        raise FileNotFoundError("chromium not found: run scripts/test-deps (apt-get install chromium)")
    proc = subprocess.run([exe, *FLAGS, f"--virtual-time-budget={budget_ms}", "--enable-logging=stderr", "--v=0",
                           "--dump-dom", url], capture_output=True, text=True, timeout=timeout)
    dom = proc.stdout
    figures, empty = {}, []
    for part in re.split(r"<section ", dom)[1:]:
        m = re.match(r'data-figure="(\w+)"', part)
        if not m:
            continue
        if 'data-empty="1"' in part[:120]:
            empty.append(m.group(1))
        else:
            figures[m.group(1)] = part.count('class="main-svg"')
    errors = []
    m = re.search(r'<pre id="report-errors"[^>]*>(.*?)</pre>', dom, re.S)
    if m and m.group(1).strip():
        errors += m.group(1).strip().splitlines()
    errors += [line for line in proc.stderr.splitlines() if "CONSOLE" in line and
               re.search(r"Uncaught|Error|error", line)]
    return {"figures": figures, "empty": empty, "errors": errors, "dom_chars": len(dom)}


def dom(url: str, budget_ms: int = 15000, timeout: float = 180, width: int = 1900, height: int = 1000) -> str:
    """The page's DOM after its scripts ran for `budget_ms` of virtual time (what a user would see)."""
    exe = chromium()
    if exe is None:
        raise FileNotFoundError("chromium not found: run scripts/test-deps (apt-get install chromium)")
    return subprocess.run([exe, *FLAGS, f"--window-size={width},{height}", f"--virtual-time-budget={budget_ms}",
                           "--dump-dom", url], capture_output=True, text=True, timeout=timeout).stdout


def screenshot(url: str, out: str | Path, width: int = 1280, height: int = 2400, budget_ms: int = 15000) -> Path:
    """Screenshot `url` into the image file `out` (parent folders created) through a `width` x
    `height` pixel window, after its scripts ran for `budget_ms` of virtual time; returns `out`, absolute.

    Raises:
        FileNotFoundError: no Chromium is installed.
        subprocess.CalledProcessError: Chromium exited with an error.
        subprocess.TimeoutExpired: it took more than 180 s."""
    exe = chromium()
    if exe is None:
        raise FileNotFoundError("chromium not found: run scripts/test-deps (apt-get install chromium)")
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([exe, *FLAGS, f"--window-size={width},{height}", f"--virtual-time-budget={budget_ms}",
                    f"--screenshot={out}", url], capture_output=True, text=True, timeout=180, check=True)
    return out
