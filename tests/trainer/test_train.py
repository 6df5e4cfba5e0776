"""Training through the real entry point (`python -m kubesloth.trainer`, a subprocess) on the tiny model: the
loss falls, every weight changes, the saved model reloads with the same logits, and a run SIGKILLed after a
checkpoint resumes to the same losses as an uninterrupted run; a partial checkpoint is never picked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from kubesloth.api.contract import CHECKPOINTS_DIR, COMPLETE_MARKER, FINAL_MODEL_DIR, SUMMARY_FILE

from .conftest import ALPACA_TINY, TrainerRun, run_trainer, trainer_command, trainer_env, write_job

# Warm-up + linear decay + accumulation: the scheduler, the optimizer and the data position must all resume.
RESUME_SPEC = {"training": {"maxSteps": 40, "perDeviceBatchSize": 4, "gradientAccumulationSteps": 2,
                            "lrScheduler": "linear", "warmupRatio": 0.1},
               "output": {"checkpointEverySteps": 10, "checkpointsToKeep": 2}}


@pytest.fixture(scope="module")
def straight(tiny_model, tmp_path_factory):
    """One uninterrupted 40-step run, shared by the tests below."""
    directory = tmp_path_factory.mktemp("straight")
    run = run_trainer(write_job(directory, tiny_model, RESUME_SPEC), directory)
    assert run.returncode == 0, run.output[-3000:]
    return directory, run


def test_loss_falls_and_every_weight_is_trained(straight, tiny_model):
    directory, run = straight
    losses = run.losses()
    assert sorted(losses) == list(range(1, 41)), "one progress line per logging step"
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (38, 39, 40)) / 3
    assert last < 0.5 * first, (first, last)
    before = load_file(tiny_model / "model.safetensors")
    after = load_file(directory / "out" / FINAL_MODEL_DIR / "model.safetensors")
    assert before.keys() == after.keys()
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert not unchanged, f"full fine-tuning must change every weight; unchanged: {unchanged}"

    summary = json.loads((directory / "out" / SUMMARY_FILE).read_text())
    assert summary["engine"] == "cpu" and summary["profile"] == "custom"
    assert summary["steps"] == 40 and summary["tokens"] > 0 and summary["tokens_per_second"] > 0
    assert summary["steady_tokens_per_second"] > 0
    assert summary["final_loss"] == pytest.approx(losses[40], abs=1e-4)
    assert summary["peak_memory"]["host_rss_peak_bytes"] > 0
    assert summary["model"]["max_logit_diff"] == 0.0
    assert run.termination.startswith("trained 40/40 steps")


def test_saved_model_reloads_with_the_same_logits(straight):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, _ = straight
    out = directory / "out"
    saved = AutoModelForCausalLM.from_pretrained(out / FINAL_MODEL_DIR, dtype=torch.float32).eval()
    # The step-40 checkpoint holds the same trained weights, written by a different code path (HF's checkpoint).
    checkpoint = AutoModelForCausalLM.from_pretrained(out / CHECKPOINTS_DIR / "step-00000040",
                                                      dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out / FINAL_MODEL_DIR)
    batch = tokenizer(["### Instruction:\nAdd one.\n\n### Input:\n4\n\n### Response:\n"],
                      return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(saved(**batch).logits, checkpoint(**batch).logits)


def test_killed_run_resumes_to_the_same_losses(straight, tiny_model, tmp_path):
    reference = straight[1].losses()
    killed_dir = tmp_path / "killed"
    killed_dir.mkdir()

    config = write_job(killed_dir, tiny_model, RESUME_SPEC)
    checkpoints = killed_dir / "out" / CHECKPOINTS_DIR
    proc = subprocess.Popen(trainer_command(config), env=trainer_env(killed_dir), cwd=killed_dir,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (checkpoints / "step-00000010" / COMPLETE_MARKER).exists():
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    first_output = proc.communicate()[0]
    assert proc.returncode == -signal.SIGKILL
    assert not (killed_dir / "out" / FINAL_MODEL_DIR).exists(), "the run finished before the kill"
    complete = sorted(p.name for p in checkpoints.iterdir() if (p / COMPLETE_MARKER).exists())
    resumed_step = int(complete[-1].split("-")[1])
    assert resumed_step < 40

    # A newer checkpoint killed mid-write (no marker): it must be ignored and removed, not resumed.
    partial = checkpoints / f"step-{resumed_step + 5:08d}"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"truncated")

    resumed = run_trainer(config, killed_dir)
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert f"resuming from {checkpoints / complete[-1]} (step {resumed_step})" in resumed.output
    assert f"removed partial checkpoint {partial}" in resumed.output
    assert not partial.exists()

    after = resumed.losses()
    assert sorted(after) == list(range(resumed_step + 1, 41)), "resume must continue at the next step"
    for step, loss in after.items():
        assert abs(loss - reference[step]) < 1e-3, (step, loss, reference[step])
    killed_losses = TrainerRun(0, first_output, "").losses()
    for step in range(1, resumed_step + 1):
        assert abs(killed_losses[step] - reference[step]) < 1e-3
    # Retention: only checkpointsToKeep complete checkpoints remain.
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000030", "step-00000040"]


def test_resume_with_a_different_optimizer_layout_does_not_crash(straight, tiny_model, tmp_path):
    """The failure unsloth users hit on resume ("loaded state dict contains a parameter group that doesn't
    match the size of optimizer's group") must not happen when the optimizer differs from the checkpoint's."""
    import shutil

    source = straight[0] / "out" / CHECKPOINTS_DIR / "step-00000040"
    target = tmp_path / "out" / CHECKPOINTS_DIR / "step-00000040"
    shutil.copytree(source, target)
    # Another spec is another run: continuing its checkpoints takes onExisting: resume (else OutputInUse).
    spec = {**RESUME_SPEC, "training": {**RESUME_SPEC["training"], "maxSteps": 44, "optimizer": "sgd"},
            "output": {**RESUME_SPEC["output"], "onExisting": "resume"}}
    run = run_trainer(write_job(tmp_path, tiny_model, spec), tmp_path)
    assert run.returncode == 0, run.output[-3000:]
    assert "resume: optimizer changed from AdamW to SGD: optimizer state reset" in run.output
    assert sorted(run.losses()) == [41, 42, 43, 44]


def test_lean_profile_with_chat_data_and_packing_on_cpu(tiny_model, tmp_path):
    """The lean preset's GPU-only choices are mapped on CPU (and logged); chat data through the tokenizer's
    template, packed rows, gradient checkpointing on: trains and saves."""
    records = [json.loads(line) for line in open(ALPACA_TINY)][:160]
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"{r['instruction']} {r.get('input', '')}".strip()},
        {"role": "assistant", "content": r["output"]}]}) + "\n" for r in records))
    spec = {"dataset": {"format": "chat", "packing": True},
            "training": {"profile": "lean", "maxSteps": 8, "learningRate": 3.0e-3, "loggingSteps": 2,
                         "optimizer": "paged_adamw_8bit", "gradientCheckpointing": "unsloth"}}
    run = run_trainer(write_job(tmp_path, tiny_model, spec, dataset=chat), tmp_path)
    assert run.returncode == 0, run.output[-3000:]
    assert "optimizer paged_adamw_8bit needs a GPU (bitsandbytes): using adamw_torch on CPU" in run.output
    assert "checkpointing true" in run.output and "packing True" in run.output
    assert "160 examples in" in run.output and "160 examples in 160 rows" not in run.output
    losses = run.losses()
    assert sorted(losses) == [2, 4, 6, 8] and losses[8] < losses[2]
