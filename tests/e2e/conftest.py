"""End-to-end fixtures: one real operator + one real node agent per test module (against the session's control
plane), a namespace per test, the tiny model made once per session."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys

import pytest

from kubesloth.local.cluster import REPO_ROOT

from .stack import Cluster, Stack

# Passed as `python -c <source>`, not as a file path: the pod mounts an emptyDir at /tmp and the node agent maps
# mount paths to the pod's own folders, exactly as a container would hide the host's /tmp — a clone under /tmp
# would make a path argument point into the pod's empty /tmp.
SLEEPER = shlex.join(["python", "-c", (REPO_ROOT / "tests" / "e2e" / "sleeper.py").read_text()])


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    subprocess.run([sys.executable, "-m", "kubesloth.trainer.tiny", "--out", str(out)], check=True,
                   capture_output=True, timeout=300)
    return out


def make_stack(cluster, tmp_path_factory, tiny_model, operator_env: dict[str, str], gpus: int = 1) -> Stack:
    work = tmp_path_factory.mktemp("e2e")
    stack = Stack(cluster, work, operator_env, gpus=gpus)
    (stack.volumes / "models").mkdir(parents=True)
    (stack.volumes / "data").mkdir()
    shutil.copytree(tiny_model, stack.volumes / "models" / "tiny-llama")
    shutil.copy(REPO_ROOT / "examples" / "data" / "alpaca-tiny.jsonl", stack.volumes / "data")
    return stack.start()


@pytest.fixture
def k8s(kubectl, namespace) -> Cluster:
    return Cluster(kubectl, namespace)
