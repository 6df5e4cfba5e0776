"""The Dockerfile's `trainer` target built for real (hack/build-trainer-image.sh: buildah, chroot isolation, a
Debian bookworm base made by mmdebstrap, exactly requirements/trainer.lock) and run: inside its root filesystem,
mounted read-only, as its non-root user, with only the cache volume, /tmp and a work directory writable, as the
pod runs it.

The image tests are marked `image` and `trainer_image`; `make test` runs them (a cold build is ~6 minutes and ~7 GB
on 2 cores, well inside CI's budget: README, "Working on it"), `make test-images` runs only the image tests, and
KUBESLOTH_IMAGE_TESTS=0 skips them. KUBESLOTH_TRAINER_IMAGE=TAG tests an image built earlier instead of building
one. The tests at the top need no image and run everywhere: the lock's consistency with pyproject.toml, the H200's
package set and the chart, and that the lock comparison fails when the two disagree."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from kubesloth.local.cluster import REPO_ROOT

SCRIPT = REPO_ROOT / "hack" / "build-trainer-image.sh"
LOCK = REPO_ROOT / "requirements" / "trainer.lock"
LOCK_IN = REPO_ROOT / "requirements" / "trainer.in"
CHECK = REPO_ROOT / "hack" / "check_lock.py"
ALPACA_TINY = REPO_ROOT / "examples" / "data" / "alpaca-tiny.jsonl"
BUILDAH = ["buildah", "--storage-driver", "vfs"]
UID = 1000

sys.path.insert(0, str(REPO_ROOT / "hack"))
import check_lock  # noqa: E402


def lock() -> dict[str, str]:
    return check_lock.read_lock(LOCK)


def excluded() -> set[str]:
    return {check_lock.canonical(m) for m in re.findall(r"#\s*exclude:\s*(\S+)", LOCK_IN.read_text())}


# --- no image needed -------------------------------------------------------------------------------------------

def test_lock_pins_every_package_with_a_hash_and_keeps_the_exclusions_out():
    lines = [line for line in LOCK.read_text().splitlines() if line and not line.startswith("#")]
    assert lines and all(re.fullmatch(r"[a-z0-9-]+==\S+ --hash=sha256:[0-9a-f]{64}", line) for line in lines)
    pins = lock()
    assert excluded() == {"torchvision", "xformers", "diffusers", "torchao"}
    assert not excluded() & pins.keys()
    for name in ("torch", "triton", "transformers", "trl", "datasets", "accelerate", "bitsandbytes", "unsloth",
                 "unsloth-zoo", "peft", "cut-cross-entropy", "safetensors", "nvidia-cudnn-cu13", "nvidia-cublas",
                 "nvidia-ml-py", "prometheus-client", "pydantic", "pyyaml", "setuptools", "wheel"):
        assert name in pins, name


def test_lock_satisfies_pyproject_ranges_and_the_h200_package_set():
    from packaging.requirements import Requirement

    import tomllib
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pins = lock()
    for text in extras["trainer"] + extras["gpu"]:
        req = Requirement(text)
        name = check_lock.canonical(req.name)
        assert name in pins and req.specifier.contains(pins[name], prereleases=True), (text, pins.get(name))
    # What bench/h200.sh installed on the H200 from ../shared/gpu/fetch_wheels.sh (and its image's transformers).
    h200 = {"unsloth": "2026.10.9", "unsloth-zoo": "2026.10.9", "trl": "1.15.0", "datasets": "4.8.5",
            "bitsandbytes": "0.50.2", "cut-cross-entropy": "25.1.1", "transformers": "5.17.0", "dill": "0.4.1",
            "multiprocess": "0.70.19", "fsspec": "2026.2.0"}
    assert {name: pins[name] for name in h200} == h200
    # unsloth 2026.10.9's caps on the two the H200 image brought in other versions.
    assert pins["torch"].startswith("2.") and int(pins["torch"].split(".")[1]) < 15


def test_lock_comparison_fails_when_the_lock_and_the_installed_set_disagree():
    pins = lock()
    assert check_lock.compare(pins, dict(pins, kubesloth="0.1.0"))["ok"]
    drifted = check_lock.compare(pins, dict(pins, trl="1.14.0"))
    assert not drifted["ok"] and drifted["differ"] == {"trl": {"lock": pins["trl"], "installed": "1.14.0"}}
    extra = check_lock.compare(pins, dict(pins, torchvision="0.29.1"))
    assert not extra["ok"] and "torchvision" in extra["extra"]
    missing = check_lock.compare(pins, {k: v for k, v in pins.items() if k != "peft"})
    assert not missing["ok"] and missing["missing"] == ["peft"]
    # The H200 mode: only the required names must match; known differences are recorded.
    h200 = dict(pins, torch="2.11.0+cu130", triton="3.6.0", numpy="1.26.4", somethingelse="1")
    report = check_lock.compare(pins, h200, require={"unsloth", "trl"}, known_differ={"torch", "triton"})
    assert report["ok"] and report["known_differ"]["torch"] == {"lock": pins["torch"], "installed": "2.11.0+cu130"}
    assert not check_lock.compare(pins, dict(h200, trl="1.14.0"), require={"unsloth", "trl"})["ok"]


def test_the_build_tags_what_the_chart_pulls_by_default():
    values = yaml.safe_load((REPO_ROOT / "charts" / "kubesloth" / "values.yaml").read_text())
    chart = yaml.safe_load((REPO_ROOT / "charts" / "kubesloth" / "Chart.yaml").read_text())
    image = values["trainer"]["image"]
    reference = f"{image['repository']}:{image['tag'] or chart['appVersion']}"
    script = SCRIPT.read_text()
    assert 'IMAGE="${IMAGE:-ghcr.io/kubesloth/trainer:$APP_VERSION}"' in script
    assert reference == f"ghcr.io/kubesloth/trainer:{chart['appVersion']}"


def test_bench_checks_the_h200_against_the_lock():
    bench = (REPO_ROOT / "bench" / "h200.sh").read_text()
    assert "hack/check_lock.py" in bench and "--known-differ" in bench and "versions.json" in bench


# --- the built image -------------------------------------------------------------------------------------------

image_marks = [
    pytest.mark.image, pytest.mark.trainer_image,
    # The first test's setup builds the image (~6 min here, 2 cores).
    pytest.mark.timeout(3600),
    pytest.mark.skipif(os.environ.get("KUBESLOTH_IMAGE_TESTS") == "0", reason="KUBESLOTH_IMAGE_TESTS=0"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (buildah, mount namespaces, chroot)"),
]


@pytest.fixture(scope="module")
def image():
    tag = os.environ.get("KUBESLOTH_TRAINER_IMAGE")
    if tag:
        yield tag
        return
    # A tag of this run's own: another test run on the same machine builds (and removes) its own.
    tag = f"localhost/kubesloth-trainer:test-{os.getpid()}"
    started = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT)], env={**os.environ, "IMAGE": tag, "KEEP_BASE": "1"},
                          capture_output=True, text=True, timeout=3600)
    output = proc.stdout + proc.stderr
    try:
        assert proc.returncode == 0, output[-6000:]
        assert f"OK: {tag} (user 1000:1000, entrypoint [python -m kubesloth.trainer]" in output, output[-3000:]
        print(f"trainer image built in {time.monotonic() - started:.0f}s")
        yield tag
    finally:
        # 6.8 GB in vfs storage: a test run leaves none behind.
        subprocess.run([*BUILDAH, "rmi", tag], capture_output=True, timeout=600)


@pytest.fixture(scope="module")
def rootfs(image):
    ctr = subprocess.run([*BUILDAH, "from", "--pull-never", image], capture_output=True, text=True, check=True,
                         timeout=900).stdout.strip()
    try:
        path = subprocess.run([*BUILDAH, "mount", ctr], capture_output=True, text=True, check=True,
                              timeout=300).stdout.strip()
        yield Path(path)
    finally:
        subprocess.run([*BUILDAH, "rm", ctr], capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def image_env(image) -> dict[str, str]:
    raw = subprocess.run([*BUILDAH, "inspect", "--type", "image", image], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    return dict(item.split("=", 1) for item in json.loads(raw)["OCIv1"]["config"]["Env"])


# The pod, without a kubelet: a private mount namespace in which the image's root is bind-mounted read-only; /tmp
# and /dev/shm are fresh tmpfs (the pod's emptyDirs), the cache volume and a work directory (the pod's PVC) are
# bind-mounted writable; then chroot as the image's user with only the image's env (plus the test's).
POD = textwrap.dedent("""\
    set -euo pipefail
    root=$1 view=$2 cache=$3 work=$4; shift 4
    mount --bind "$root" "$view"
    mount -o remount,bind,ro "$view"
    mount -t proc proc "$view/proc"
    mount --rbind /dev "$view/dev"
    mount -t tmpfs -o mode=1777 tmpfs "$view/dev/shm"
    mount -t tmpfs -o mode=1777 tmpfs "$view/tmp"
    mount --bind "$cache" "$view/var/cache/kubesloth"
    mount --bind "$work" "$view/mnt"
    exec chroot --userspec=1000:1000 "$view" /usr/bin/env -i "$@"
""")


@pytest.fixture
def pod(rootfs, image_env, tmp_path):
    cache, work, view = tmp_path / "cache", tmp_path / "work", tmp_path / "view"
    for directory in (cache, work, view):
        directory.mkdir()
    for directory in (cache, work):
        os.chown(directory, UID, UID)

    def run(*argv: str, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
        full = {**image_env, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                "TOKENIZERS_PARALLELISM": "false", **env}
        return subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", POD, "pod",
                               str(rootfs), str(view), str(cache), str(work),
                               *(f"{k}={v}" for k, v in full.items()), *argv],
                              capture_output=True, text=True, timeout=timeout)

    run.cache, run.work = cache, work
    return run


def _ok(proc: subprocess.CompletedProcess) -> str:
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    return output


def _last_json(proc: subprocess.CompletedProcess):
    _ok(proc)
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.usefixtures("image")
class TestTrainerImage:
    pytestmark = image_marks

    def test_installed_packages_are_exactly_the_lock(self, pod):
        shutil.copy(CHECK, pod.work / "check_lock.py")
        shutil.copy(LOCK, pod.work / "trainer.lock")
        proc = pod("python", "/mnt/check_lock.py", "--lock", "/mnt/trainer.lock", "--json", "/mnt/report.json")
        report = json.loads((pod.work / "report.json").read_text())
        assert proc.returncode == 0 and report["ok"], report["problems"]
        assert len(report["matched"]) == len(lock()) and report["extra"] == {}

    def test_every_declared_requirement_is_met_but_the_documented_exclusions(self, pod):
        # pip check's view (pip itself is not in the image): each installed package's requirements, markers
        # evaluated here, against what is installed. Only unsloth/unsloth_zoo's excluded names may be unmet.
        script = textwrap.dedent("""\
            import importlib.metadata as md, json
            from packaging.requirements import Requirement
            from packaging.utils import canonicalize_name as c
            have = {c(d.metadata["Name"]): d.version for d in md.distributions()}
            unmet = []
            for d in md.distributions():
                for text in d.requires or []:
                    r = Requirement(text)
                    if r.marker and not r.marker.evaluate({"extra": ""}):
                        continue
                    v = have.get(c(r.name))
                    if v is None or not r.specifier.contains(v, prereleases=True):
                        unmet.append([c(d.metadata["Name"]), text, v])
            print(json.dumps(unmet))
        """)
        unmet = _last_json(pod("python", "-c", script))
        assert {name for _, text, version in unmet for name in [check_lock.canonical(re.split(r"[ ;<>=!~\[]", text)[0])]
                if version is None} <= excluded(), unmet
        assert all(version is None for _, _, version in unmet), [u for u in unmet if u[2] is not None]
        assert {owner for owner, _, _ in unmet} <= {"unsloth", "unsloth-zoo", "peft"}, unmet

    def test_imports_what_the_trainer_imports_and_nothing_excluded(self, pod):
        script = textwrap.dedent("""\
            import importlib, importlib.util as u, json, sysconfig, os
            import torch, triton, transformers, trl, datasets, accelerate, bitsandbytes, peft, safetensors
            import cut_cross_entropy, prometheus_client, pynvml, tokenizers, yaml, pydantic
            import zstandard, lz4.frame  # .zst / .lz4 dataset files
            import s3fs  # s3:// models and datasets
            import kubesloth.trainer, kubesloth.trainer.main
            from kubesloth.trainer.engines import cpu, hf, fused, unsloth as engine
            site = sysconfig.get_paths()["purelib"]
            print(json.dumps({
                "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                "triton": triton.__version__, "cuda_available": torch.cuda.is_available(),
                "absent": [m for m in ("torchvision", "xformers", "diffusers", "torchao", "studio", "pip")
                           if u.find_spec(m) is not None],
                "studio_dir": os.path.exists(os.path.join(site, "studio")),
            }))
        """)
        facts = _last_json(pod("python", "-c", script))
        # torch.__version__ carries the build's local tag (2.14.1+cu130); its distribution version is the lock's.
        assert facts["torch"] == lock()["torch"] + "+cu130" and facts["triton"] == lock()["triton"], facts
        assert facts["cuda"] == "13.0" and facts["cudnn"] and facts["cuda_available"] is False, facts
        assert facts["absent"] == [] and facts["studio_dir"] is False, facts

    def test_import_unsloth_without_a_gpu_falls_back_to_cpu_or_raises_when_told(self, pod):
        code = "import unsloth; print('DEVICE', unsloth.DEVICE_TYPE, unsloth.__version__)"
        fallback = _ok(pod("python", "-c", code))
        assert "DEVICE cpu 2026.10.9" in fallback and "no GPU found, training on CPU" in fallback, fallback[-3000:]
        strict = pod("python", "-c", code, UNSLOTH_DISABLE_CPU_FALLBACK="1")
        output = strict.stdout + strict.stderr
        assert strict.returncode != 0 and "NotImplementedError" in output, output[-3000:]
        assert "Unsloth cannot find any torch accelerator? You need a GPU." in output, output[-3000:]

    def test_triton_can_build_its_launcher_as_the_pod_user(self, pod):
        # What Triton does on a GPU before its first kernel: compile its driver.c (a Python extension: Python.h and
        # the cuda.h it ships) with gcc into TRITON_CACHE_DIR. Here without -lcuda (no driver on this machine).
        script = textwrap.dedent("""\
            import os
            from triton.runtime.build import compile_so_from_file
            from triton.backends.nvidia import driver
            src = os.path.join(os.path.dirname(driver.__file__), "driver.c")
            print("BUILT", compile_so_from_file(src, "cuda_utils", [], driver.include_dirs, []))
        """)
        output = _ok(pod("python", "-c", script))
        assert "BUILT /var/cache/kubesloth/triton/" in output, output

    def test_trains_the_tiny_model_on_cpu_with_a_read_only_root_and_saves(self, pod, image_env):
        from kubesloth.operator import builders
        # The image declares the cache env the operator sets on the pod.
        assert {k: image_env.get(k) for k in builders.CACHE_ENV} == builders.CACHE_ENV
        shutil.copy(ALPACA_TINY, pod.work / "alpaca-tiny.jsonl")
        _ok(pod("python", "-m", "kubesloth.trainer.tiny", "--out", "/mnt/tiny-llama",
                "--corpus", "/mnt/alpaca-tiny.jsonl"))
        spec = {"model": {"source": "file:///mnt/tiny-llama", "maxSeqLength": 128},
                "dataset": {"source": "file:///mnt/alpaca-tiny.jsonl", "format": "alpaca"},
                "training": {"profile": "custom", "maxSteps": 10, "learningRate": 3.0e-3, "perDeviceBatchSize": 8,
                             "gradientAccumulationSteps": 1, "optimizer": "adamw_torch",
                             "gradientCheckpointing": "false", "lrScheduler": "constant", "warmupRatio": 0.0,
                             "seed": 3407, "loggingSteps": 1},
                "output": {"destination": "file:///mnt/out", "checkpointEverySteps": 5}}
        (pod.work / "finetunejob.yaml").write_text(yaml.safe_dump(
            {"apiVersion": "kubesloth.io/v1alpha1", "kind": "FineTuneJob",
             "metadata": {"name": "tiny", "namespace": "test"}, "spec": spec}))
        for path in pod.work.rglob("*"):
            os.chown(path, UID, UID)
        # The image's own entry point (ENTRYPOINT python -m kubesloth.trainer), as the operator's env has it.
        proc = pod("python", "-m", "kubesloth.trainer", KUBESLOTH_ENGINE="cpu", KUBESLOTH_METRICS_PORT="0",
                   KUBESLOTH_CONFIG="/mnt/finetunejob.yaml", KUBESLOTH_TERMINATION_LOG="/mnt/termination-log",
                   KUBESLOTH_PVC_ROOT="/mnt/pvc")
        output = _ok(proc)
        assert re.search(r"step 10/10 loss", output), output[-3000:]
        model = pod.work / "out" / "model"
        assert (model / "model.safetensors").exists() and (model / "config.json").exists(), output[-3000:]
        assert json.loads((pod.work / "out" / "summary.json").read_text())
        assert "Read-only file system" not in output
