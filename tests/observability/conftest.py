"""Fixtures for the observability tests: Debian's prometheus + promtool, unpacked once by hack/install-prometheus.sh."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from kubesloth.local.cluster import REPO_ROOT

INSTALL_SCRIPT = REPO_ROOT / "hack" / "install-prometheus.sh"
ALERTS_DIR = REPO_ROOT / "charts" / "kubesloth" / "files" / "alerts"
DASHBOARDS_DIR = REPO_ROOT / "charts" / "kubesloth" / "files" / "dashboards"


@pytest.fixture(scope="session")
def prometheus_bin() -> Path:
    """The bin dir holding `prometheus` and `promtool` (downloaded from Debian the first time, ~5 s)."""
    proc = subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{INSTALL_SCRIPT} failed:\n{proc.stderr}"
    return Path(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def promtool(prometheus_bin) -> Path:
    return prometheus_bin / "promtool"
