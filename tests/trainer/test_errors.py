"""Each bad input exits with its api.contract.ExitCode and a one-line message naming what is wrong, written to
the termination log (the operator reads it); checks before training, so these fail in seconds."""

from __future__ import annotations

import json
import os

import pytest

from kubesloth.api.contract import ExitCode

from .conftest import run_trainer, write_job

TOKEN = "hf_secretsecretsecret123"


def case(tmp_path, tiny_model, kind):
    """(config path, env, expected code, expected message parts) for one kind of bad input."""
    env = {}
    if kind == "invalid-field":
        config = write_job(tmp_path, tiny_model, {"training": {"learningRate": 2}})
        return config, env, ExitCode.BAD_CONFIG, ["spec.training.learningRate", "less than 1"]
    if kind == "not-yaml":
        config = tmp_path / "bad.yaml"
        config.write_text("spec: [unclosed\n")
        return config, env, ExitCode.BAD_CONFIG, ["not valid YAML"]
    if kind == "missing-config":
        return tmp_path / "nope.yaml", env, ExitCode.BAD_CONFIG, ["nope.yaml does not exist"]
    if kind == "unknown-engine":
        env["KUBESLOTH_ENGINE"] = "tpu"
        return write_job(tmp_path, tiny_model), env, ExitCode.BAD_CONFIG, ["KUBESLOTH_ENGINE", "allowed: auto"]
    if kind == "gpu-engine-without-gpu":
        env["KUBESLOTH_ENGINE"] = "unsloth"
        return write_job(tmp_path, tiny_model), env, ExitCode.BAD_CONFIG, ["needs a CUDA GPU"]
    if kind == "missing-model":
        config = write_job(tmp_path, tiny_model, {"model": {"source": "pvc://models/absent"}})
        return config, env, ExitCode.SOURCE_NOT_FOUND, ["spec.model.source", "pvc://models/absent",
                                                        str(tmp_path / "pvc" / "models" / "absent")]
    if kind == "not-a-model":
        config = write_job(tmp_path, tiny_model, {"model": {"source": f"file://{tmp_path}"}})
        return config, env, ExitCode.SOURCE_NOT_FOUND, ["spec.model.source", "no config.json"]
    if kind == "missing-dataset":
        config = write_job(tmp_path, tiny_model, {"dataset": {"source": "file:///nonexistent/data.jsonl"}})
        return config, env, ExitCode.SOURCE_NOT_FOUND, ["spec.dataset.source", "/nonexistent/data.jsonl"]
    if kind == "hf-offline-with-token":
        env.update(HF_TOKEN=TOKEN, HF_HOME=str(tmp_path / "hf-home"))
        config = write_job(tmp_path, tiny_model, {"model": {"source": "hf://acme/private-model"}})
        return config, env, ExitCode.SOURCE_NOT_FOUND, ["hf://acme/private-model", "not in the local"]
    if kind == "s3-without-extra":
        config = write_job(tmp_path, tiny_model, {"dataset": {"source": "s3://bucket-x/data.jsonl"}})
        hidden = tmp_path / "no-s3fs" / "s3fs"  # an image without the extra, even where s3fs is installed here
        hidden.mkdir(parents=True)
        (hidden / "__init__.py").write_text("raise ImportError('s3fs is not installed')\n")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hidden.parent), os.environ.get("PYTHONPATH")]))
        return config, env, ExitCode.SOURCE_NOT_FOUND, ["spec.dataset.source", "kubesloth[s3]"]
    if kind == "unwritable-output":
        blocker = tmp_path / "a-file"
        blocker.write_text("x")
        config = write_job(tmp_path, tiny_model, destination=blocker / "out")
        return config, env, ExitCode.OUTPUT_UNWRITABLE, ["spec.output.destination", "a-file"]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["invalid-field", "not-yaml", "missing-config", "unknown-engine",
                                  "gpu-engine-without-gpu", "missing-model", "not-a-model", "missing-dataset",
                                  "hf-offline-with-token", "s3-without-extra", "unwritable-output"])
def test_bad_input_exit_code_and_message(kind, tiny_model, tmp_path):
    config, env, code, parts = case(tmp_path, tiny_model, kind)
    run = run_trainer(config, tmp_path, timeout=60, **env)
    assert run.returncode == code, run.output[-2000:]
    message = run.termination.strip()
    assert "\n" not in message and len(message.encode()) < 1024
    from kubesloth.api.contract import EXIT_REASONS
    assert message.startswith(EXIT_REASONS[code] + ": ")
    for part in parts:
        assert part in message, (part, message)
    assert TOKEN not in run.output and TOKEN not in message
    assert "Traceback" not in run.output


def test_dataset_not_matching_its_format(tiny_model, tmp_path):
    data = tmp_path / "chatty.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    run = run_trainer(write_job(tmp_path, tiny_model, dataset=data), tmp_path, timeout=90)
    assert run.returncode == ExitCode.BAD_CONFIG, run.output[-2000:]
    assert "spec.dataset.format: record 0 has no field 'instruction'" in run.termination
    assert not (tmp_path / "out" / "model").exists()


def test_disk_full_during_a_checkpoint(tiny_model, tmp_path):
    """A real full file system (a 1.5 MiB tmpfs: room for the weights, so the start-up check passes, not for the
    first checkpoint's optimizer state): torch's cryptic write error becomes OUTPUT_UNWRITABLE, disk full."""
    import subprocess

    mount = tmp_path / "small-disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1500k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root with CAP_SYS_ADMIN)")
    try:
        run = run_trainer(write_job(tmp_path, tiny_model, destination=mount / "out"), tmp_path)
    finally:
        subprocess.run(["umount", str(mount)], check=False)
    assert run.returncode == ExitCode.OUTPUT_UNWRITABLE, run.output[-2000:]
    assert run.termination.startswith("OutputUnwritable: spec.output.destination: disk full")
    assert "at step 10" in run.termination
