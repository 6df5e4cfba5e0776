"""Issue 11 through the real entry point on the tiny model: a FineTuneJob recreated with the same output is
refused by default and `onExisting: resume` continues it; two trainers on one output never write at once (the
second waits for the first's lock); a checkpoint too slow for the grace period is skipped, never half-written,
and the resume uses the previous one."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from kubesloth.api import contract
from kubesloth.api.contract import CHECKPOINTS_DIR, FINAL_MODEL_DIR, LOCK_FILE, ExitCode
from kubesloth.trainer.checkpoints import CheckpointManager

from .conftest import TrainerRun, run_trainer, trainer_command, trainer_env, write_job

LONG = {"training": {"maxSteps": 400, "perDeviceBatchSize": 2, "loggingSteps": 1},
        "output": {"checkpointEverySteps": 10, "checkpointsToKeep": 3}}


class Running:
    """A trainer subprocess whose output is read by a thread (so a test can wait for a line)."""

    def __init__(self, config: Path, directory: Path, **env: str):
        self.proc = subprocess.Popen(trainer_command(config), env=trainer_env(directory, **env), cwd=directory,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.directory = directory
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if text in line:
                    return line
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.02)
        raise AssertionError(f"no {text!r} in the output:\n{''.join(self.lines)[-3000:]}")

    def finish(self, timeout: float = 300) -> TrainerRun:
        self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        term = self.directory / "termination-log"
        return TrainerRun(self.proc.returncode, "".join(self.lines), term.read_text() if term.exists() else "")


def all_complete_checkpoints_load(output: Path) -> list[int]:
    manager = CheckpointManager(output, keep=100)
    steps = []
    for checkpoint in manager.complete():
        assert checkpoint.problem() is None
        load_file(checkpoint.path / "model.safetensors")
        torch.load(checkpoint.path / "optimizer.pt", weights_only=True)
        steps.append(checkpoint.step)
    return steps


def test_recreated_job_refuses_by_default_and_resume_continues(tiny_model, tmp_path):
    first_dir, second_dir, straight_dir = (tmp_path / n for n in ("first", "second", "straight"))
    for d in (first_dir, second_dir, straight_dir):
        d.mkdir()
    output = tmp_path / "out"
    short = {"training": {"maxSteps": 20}}
    first = run_trainer(write_job(first_dir, tiny_model, short, destination=output, metadata={"uid": "uid-a"}),
                        first_dir)
    assert first.returncode == 0, first.output[-3000:]
    model_bytes = (output / FINAL_MODEL_DIR / "model.safetensors").read_bytes()

    # The same YAML applied again after a delete: a new uid. Before: Succeeded with 0 steps trained.
    again = run_trainer(write_job(second_dir, tiny_model, short, destination=output, metadata={"uid": "uid-b"}),
                        second_dir)
    assert again.returncode == ExitCode.OUTPUT_IN_USE, again.output[-3000:]
    assert again.termination.startswith("OutputInUse: spec.output.destination")
    assert "holds checkpoints (newest step 20) of another run" in again.termination
    assert "metadata.uid uid-a -> uid-b" in again.termination and "onExisting: resume" in again.termination
    assert "step 1/" not in again.output, "nothing trained"
    # Another learning rate (before: a silent resume at the new rate) names the field.
    other_lr = run_trainer(write_job(second_dir, tiny_model, {"training": {"maxSteps": 20, "learningRate": 1e-3}},
                                     destination=output, metadata={"uid": "uid-b"}), second_dir)
    assert other_lr.returncode == ExitCode.OUTPUT_IN_USE
    assert "spec.training.learningRate 0.003 -> 0.001" in other_lr.termination
    assert (output / FINAL_MODEL_DIR / "model.safetensors").read_bytes() == model_bytes, "the model is untouched"

    # onExisting: resume, and 10 more steps: continues from step 20 to the losses of a straight 30-step run.
    resumed = run_trainer(write_job(second_dir, tiny_model, {"training": {"maxSteps": 30},
                                                             "output": {"onExisting": "resume"}},
                                    destination=output, metadata={"uid": "uid-b"}), second_dir)
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert "onExisting resume: continuing checkpoints (newest step 20)" in resumed.output
    straight = run_trainer(write_job(straight_dir, tiny_model, {"training": {"maxSteps": 30}}), straight_dir)
    reference = straight.losses()
    after = resumed.losses()
    assert sorted(after) == list(range(21, 31))
    for step, loss in after.items():
        assert abs(loss - reference[step]) < 1e-3, (step, loss, reference[step])
    newest = CheckpointManager(output, keep=2).latest()
    assert newest.step == 30 and newest.metadata()["run"]["uid"] == "uid-b", "new checkpoints are the new run's"
    summary = json.loads((output / "summary.json").read_text())
    assert summary["run"]["uid"] == "uid-b"


def test_two_trainers_on_one_output_never_write_at_once(tiny_model, tmp_path):
    old_dir, new_dir = tmp_path / "old", tmp_path / "new"
    old_dir.mkdir()
    new_dir.mkdir()
    output = tmp_path / "out"
    env = {"KUBESLOTH_LOCK_HEARTBEAT_SECONDS": "0.5"}  # stale after 3 s
    spec = {**LONG, "training": {**LONG["training"], "maxSteps": 5000}}
    # The old one is slow on purpose (its checkpoints take 0.3 s): it is still training when the new one starts.
    old = Running(write_job(old_dir, tiny_model, spec, destination=output, metadata={"uid": "u"}), old_dir,
                  KUBESLOTH_TEST_CHECKPOINT_DELAY_SECONDS="0.3", **env)
    new = None
    try:
        old.wait_for("checkpoint step 10 ->")
        # The replacement pod of the same FineTuneJob starts while the old trainer still writes.
        new = Running(write_job(new_dir, tiny_model, spec, destination=output, metadata={"uid": "u"}), new_dir,
                      **env)
        new.wait_for("is held by pod")
        time.sleep(5)  # longer than the stale time: the old one's heartbeat keeps its lock fresh
        assert old.proc.poll() is None, "the old trainer is still training"
        assert not any("lock held" in line for line in new.lines), "".join(new.lines)[-2000:]
        old.wait_for("checkpoint step 30 ->")
        old.proc.send_signal(signal.SIGTERM)
        first = old.finish()
        assert first.returncode == ExitCode.INTERRUPTED, first.output[-3000:]
        interrupt_step = contract.parse_state(first.termination)["checkpoint"]["step"]
        second = new.finish()
    finally:
        for run in (old, new):
            if run is not None and run.proc.poll() is None:
                run.proc.kill()
    assert second.returncode == 0, second.output[-3000:]
    assert f"resuming from {output / CHECKPOINTS_DIR / f'step-{interrupt_step:08d}'}" in second.output, \
        "the second trainer started after the first wrote its interrupt checkpoint"
    assert "removed staging leftovers" not in second.output, "it never deleted the other's .staging"
    assert all_complete_checkpoints_load(output)
    assert not (output / LOCK_FILE).exists(), "released on exit"


def test_slow_checkpoint_with_a_short_grace_is_skipped_and_resume_uses_the_previous(tiny_model, tmp_path):
    output = tmp_path / "out"
    config = write_job(tmp_path, tiny_model, LONG, destination=output, metadata={"uid": "u"})
    slow = Running(config, tmp_path, KUBESLOTH_TEST_CHECKPOINT_DELAY_SECONDS="3",
                   KUBESLOTH_TERMINATION_GRACE_SECONDS="6")
    try:
        slow.wait_for("checkpoint step 10 ->")  # that write took >= 3 s: 3 x 1.25 + 5 > 6
        signalled = time.monotonic()
        slow.proc.send_signal(signal.SIGTERM)
        run = slow.finish()
    finally:
        if slow.proc.poll() is None:
            slow.proc.kill()
    assert time.monotonic() - signalled < 6, "it stopped inside the grace period"
    assert run.returncode == ExitCode.INTERRUPTED, run.output[-3000:]
    state = contract.parse_state(run.termination)
    assert state["interrupt"] == "skipped" and state["checkpoint"]["step"] == 10
    assert "interrupt checkpoint skipped" in run.termination and "the newest is step 10" in run.termination
    assert state["lostSteps"] >= 1
    assert all_complete_checkpoints_load(output) == [10], "nothing half-written, nothing started"
    assert not (output / CHECKPOINTS_DIR / ".staging").exists()

    changed_dir = tmp_path / "changed"
    changed_dir.mkdir()
    changed = run_trainer(write_job(changed_dir, tiny_model, {**LONG, "training": {**LONG["training"], "maxSteps": 20}},
                                    destination=output, metadata={"uid": "u"}), changed_dir)
    assert changed.returncode == ExitCode.OUTPUT_IN_USE, "maxSteps changed: another run"
    assert "spec.training.maxSteps 400 -> 20" in changed.termination
    resumed = run_trainer(config, tmp_path)
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert f"resuming from {output / CHECKPOINTS_DIR / 'step-00000010'} (step 10)" in resumed.output
