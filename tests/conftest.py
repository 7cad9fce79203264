"""Shared fixtures: one small phantom dataset per session, a private cache folder."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from trainer.data.layout import Layout
from trainer.data.phantom import make_phantom


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Never touch the user's ~/.cache/spinesweep from tests."""
    old = os.environ.get("SPINESWEEP_CACHE")
    os.environ["SPINESWEEP_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("SPINESWEEP_CACHE", None)
    else:
        os.environ["SPINESWEEP_CACHE"] = old


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """A small phantom (10 train + 2 test studies), built once per session. Read-only: copy it
    (`phantom_copy`) before breaking anything."""
    out = tmp_path_factory.mktemp("phantom")
    make_phantom(out, studies=10, test_studies=2, seed=7, jobs=2)
    return out


@pytest.fixture
def phantom_copy(phantom_dir, tmp_path) -> Path:
    dst = tmp_path / "data"
    shutil.copytree(phantom_dir, dst)
    return dst


@pytest.fixture(scope="session")
def layout(phantom_dir) -> Layout:
    return Layout(phantom_dir)


@pytest.fixture(scope="session")
def phantom30_dir(tmp_path_factory) -> Path:
    """A 30-study phantom (and 2 test studies), built once per session for the slow tests that
    measure point statistics or train the localiser. Read-only."""
    out = tmp_path_factory.mktemp("phantom30")
    make_phantom(out, studies=30, test_studies=2, seed=1, jobs=2)
    return out
