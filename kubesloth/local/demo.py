"""README command 1: a FineTuneJob end to end on the local control plane."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from kubesloth.local.cluster import REPO_ROOT, LocalCluster

CRD_FILE = REPO_ROOT / "crds" / "kubesloth.io_finetunejobs.yaml"


def kubectl(cluster: LocalCluster, *args: str, check: bool = True, capture: bool = False
            ) -> subprocess.CompletedProcess:
    return subprocess.run(["kubectl", *args], env=cluster.env(), check=check, text=True,
                          capture_output=capture)


def install_crd(cluster: LocalCluster) -> None:
    kubectl(cluster, "apply", "-f", str(CRD_FILE))
    kubectl(cluster, "wait", "--for=condition=Established", "--timeout=60s",
            "crd/finetunejobs.kubesloth.io")


def run_demo(state_dir: Path, example: Path, timeout: float = 600.0, keep: bool = False) -> int:
    cluster = LocalCluster(state_dir)
    print(f"[demo] starting the local control plane in {cluster.state_dir}", flush=True)
    cluster.up()
    try:
        install_crd(cluster)
        kubectl(cluster, "apply", "-f", str(example))
        kubectl(cluster, "get", "ftj", "-o", "wide")
    finally:
        if keep:
            print(f"[demo] control plane left running: export KUBECONFIG={cluster.kubeconfig}")
        else:
            cluster.down()
    return 0


if __name__ == "__main__":
    sys.exit(run_demo(Path(".kubesloth/cluster"), REPO_ROOT / "examples" / "finetunejob-tiny.yaml"))
