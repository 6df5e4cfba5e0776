"""A real S3-compatible server on loopback (moto's server mode, its own process) and the trainer's s3:// client
(s3fs), for the s3:// source tests. Nothing here skips: both are installed on first use and cached under
~/.cache/kubesloth, like the control plane's binaries.

Why not the dev extra: pip cannot resolve s3fs (or moto, or boto3) beside the operator extra. kubernetes==37.0.2
requires python-dateutil>=3.0.0; every botocore (1.43.x, 1.44.x) and aiobotocore (2.19 .. 3.10) requires
python-dateutil<3.0.0, and s3fs needs aiobotocore, moto needs botocore: `pip install '.[operator,dev]' s3fs` ends in
ResolutionImpossible (pyproject.toml says the same). So:
- moto's server runs in its own venv (pip resolves it there: no kubernetes client), a separate process anyway;
- the client side runs in the test process, where the trainer's code is: if s3fs is not importable (a fresh
  `make test` venv), the pinned client packages are installed with --no-deps into a cache folder that is appended
  to sys.path (the venv's own packages, python-dateutil 4 included, come first). The trainer image has no
  kubernetes client and installs the `s3` extra normally.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

MOTO_VERSION = "5.2.5"
CACHE = Path.home() / ".cache" / "kubesloth"


def s3_client_requirements() -> list[str]:
    """s3fs is released in lockstep with fsspec (s3fs X requires fsspec==X): the one matching the installed
    fsspec (datasets pins it), and what it needs that the trainer's own packages do not bring."""
    import fsspec

    return [f"s3fs=={fsspec.__version__}", "aiobotocore==3.6.0", "botocore==1.43.0", "aioitertools==0.13.0",
            "jmespath==1.1.0", "wrapt==2.5.2"]


def ensure_s3_client() -> None:
    """Make `import s3fs` work in this process (see the module docstring)."""
    try:
        import s3fs  # noqa: F401  (installed: the trainer image's s3 extra, or this venv by hand)
        return
    except ImportError:
        pass
    wanted = s3_client_requirements()
    target = CACHE / f"s3-client-{hashlib.sha256(' '.join(wanted).encode()).hexdigest()[:12]}"
    if not (target / ".complete").exists():
        partial = target.with_name(target.name + f".partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        # cwd: not the checkout, whose operator/ would shadow the stdlib's `operator` for `python -m pip`.
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(partial),
                        *wanted], check=True, timeout=600, cwd=CACHE)
        (partial / ".complete").write_text("\n".join(wanted) + "\n")
        if (target / ".complete").exists():  # another test run finished first: use its folder
            shutil.rmtree(partial, ignore_errors=True)
        else:
            shutil.rmtree(target, ignore_errors=True)  # a folder an interrupted install left
            partial.rename(target)
    if str(target) not in sys.path:
        sys.path.append(str(target))
    import s3fs  # noqa: F401,F811


def moto_python() -> Path:
    """moto's server, in its own venv (pip resolves moto there: no kubernetes client beside it)."""
    if os.environ.get("KUBESLOTH_MOTO_PYTHON"):
        return Path(os.environ["KUBESLOTH_MOTO_PYTHON"])
    venv = CACHE / f"moto-{MOTO_VERSION}"
    python = venv / "bin" / "python"
    if not (venv / ".complete").exists():
        # A venv of an earlier version of this helper (no marker) is kept when moto's server imports there.
        works = python.exists() and subprocess.run([str(python), "-c", "import moto.server"], cwd=venv.parent,
                                                   capture_output=True, timeout=120).returncode == 0
        if not works:
            CACHE.mkdir(parents=True, exist_ok=True)
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, timeout=120,
                           cwd=CACHE)  # not the checkout (its operator/ would shadow the stdlib's)
            subprocess.run([str(python), "-m", "pip", "install", "-q", f"moto[server]=={MOTO_VERSION}"],
                           check=True, timeout=600, cwd=venv)
        (venv / ".complete").write_text(MOTO_VERSION + "\n")
    return python


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """moto's S3 over HTTP on 127.0.0.1 (a free port), and the env a boto client needs to reach it."""
    ensure_s3_client()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(moto_python()), "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=log.parent)  # not the repo: its operator/
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start: {log.read_text()[-2000:]}")
                time.sleep(0.2)
        yield {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def s3(s3_server, monkeypatch, tmp_path):
    """(an s3fs filesystem on the server, a fresh bucket); the trainer's own s3fs clients see the same env."""
    import s3fs
    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr("datasets.config.HF_DATASETS_CACHE", str(tmp_path / "cache"))
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    bucket = f"data-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    fs.mkdir(bucket)
    yield fs, bucket
    s3fs.S3FileSystem.clear_instance_cache()
