"""hack/install-prometheus.sh on an empty cache: Debian's prometheus + promtool unpacked, nothing started; the
second run is a no-op that prints the same bin dir."""

from __future__ import annotations

import os
import subprocess
import time

from .conftest import INSTALL_SCRIPT


def test_install_script_unpacks_debian_prometheus_into_the_cache_and_is_idempotent(tmp_path):
    env = {**os.environ, "KUBESLOTH_CACHE": str(tmp_path / "cache")}
    first = subprocess.run(["bash", str(INSTALL_SCRIPT)], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    bin_dir = first.stdout.strip()
    assert bin_dir == str(tmp_path / "cache" / "prometheus-2.42.0" / "bin")
    assert sorted(os.listdir(bin_dir)) == ["prometheus", "promtool"]
    for tool in ("prometheus", "promtool"):
        version = subprocess.run([f"{bin_dir}/{tool}", "--version"], capture_output=True, text=True)
        assert "version 2.42.0" in version.stdout + version.stderr
    assert os.listdir(tmp_path / "cache") == ["prometheus-2.42.0"]  # no build leftovers

    started = time.monotonic()
    second = subprocess.run(["bash", str(INSTALL_SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert second.returncode == 0 and second.stdout.strip() == bin_dir
    assert second.stderr == "" and time.monotonic() - started < 5  # cached: no apt at all
