"""The node agent's pure helpers: quantities and the mount-path rewriting that maps a pod's paths to local folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubesloth.local.nodeagent import parse_quantity, rewrite_path

MOUNTS = sorted([("/mnt/pvc/models", Path("/v/models")), ("/mnt/pvc/outputs", Path("/v/outputs")),
                 ("/etc/kubesloth", Path("/w/pod/volumes/config")), ("/tmp", Path("/w/pod/volumes/tmp"))],
                key=lambda item: len(item[0]), reverse=True)


@pytest.mark.parametrize("value, local", [
    ("/etc/kubesloth/finetunejob.yaml", "/w/pod/volumes/config/finetunejob.yaml"),
    ("/etc/kubesloth", "/w/pod/volumes/config"),
    ("/mnt/pvc/outputs/run/model", "/v/outputs/run/model"),
    ("/mnt/pvc", "/v"),  # a parent whose mounts all map under one local parent (KUBESLOTH_PVC_ROOT)
    ("/mnt/pvc/", "/v"),
    ("/mnt", "/mnt"),  # mounts under it do not share one local parent with the same layout
    ("/etc/kubesloth-other", "/etc/kubesloth-other"),  # a prefix of the name, not of the path
    ("relative/path", "relative/path"),
    ("9400", "9400"),
])
def test_rewrite_path(value, local):
    assert rewrite_path(value, MOUNTS) == local


@pytest.mark.parametrize("text, number", [("2Gi", 2 * 2**30), ("500m", 0.5), ("1", 1), ("1.5G", 1.5e9),
                                          ("128Mi", 128 * 2**20)])
def test_parse_quantity(text, number):
    assert parse_quantity(text) == number


def test_bad_quantity_is_named():
    with pytest.raises(ValueError, match="2 GB"):
        parse_quantity("2 GB")
