"""Fixtures of the fault suite (the engines themselves are in engines.py)."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from engines import PASSWORD, Postgres, _as_postgres, _pg_bin, free_port


@pytest.fixture(scope="session")
def postgres():
    pg_bin = _pg_bin()
    if pg_bin is None:
        pytest.fail("PostgreSQL is not installed: scripts/test installs it (scripts/test-deps)")
    root = Path(tempfile.mkdtemp(prefix="spinesweep-pg-", dir="/tmp"))
    root.chmod(0o777)
    data = root / "data"
    pwfile = root / "pw"
    pwfile.write_text(PASSWORD + "\n")
    pwfile.chmod(0o644)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    _as_postgres([str(pg_bin / "initdb"), "-D", str(data), "-U", "spinesweep", "--pwfile", str(pwfile),
                  "-A", "scram-sha-256", "--no-sync"])
    pg = Postgres(pg_bin, data, free_port())
    pg.start()
    yield pg
    try:
        pg.stop()
    except subprocess.CalledProcessError:
        pass
    shutil.rmtree(root, ignore_errors=True)


