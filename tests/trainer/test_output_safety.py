"""Issue 11 (one run, one output; one writer; a COMPLETE checkpoint has all its files; the interrupt checkpoint
knows its deadline), unit level: run identity and hash, the lock's takeover with a fake clock, manifest checks,
the deadline decision, and the termination message's state."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from kubesloth.api import contract
from kubesloth.api.contract import COMPLETE_MARKER, LOCK_FILE, SUPERSEDED_DIR
from kubesloth.api.v1alpha1 import FineTuneJob
from kubesloth.trainer.checkpoints import (MANIFEST_FILE, CheckpointLost, CheckpointManager, Deadline,
                                           InterruptCheckpointSkipped, estimate_write_seconds,
                                           interrupt_write_decision)
from kubesloth.trainer.errors import Interrupted, OutputInUse
from kubesloth.trainer.output import (OutputLock, decide, differences, existing_run, run_identity, same_run)


def job(uid="u-1", **spec_changes) -> FineTuneJob:
    spec = {"model": {"source": "pvc://models/tiny", "maxSeqLength": 128},
            "dataset": {"source": "pvc://data/a.jsonl"},
            "training": {"learningRate": 3e-3, "maxSteps": 30},
            "output": {"destination": "pvc://out/tiny"}}
    for path, value in spec_changes.items():
        section, key = path.split("__")
        spec.setdefault(section, {})[key] = value
    return FineTuneJob.model_validate({"metadata": {"name": "tiny", "namespace": "ml", "uid": uid}, "spec": spec})


# --- run identity --------------------------------------------------------------------------------------------------
def test_identity_hashes_the_training_fields_only():
    base = run_identity(job())
    assert base["uid"] == "u-1" and len(base["spec_hash"]) == 16
    # Not training: suspend, ttl, resources, output cadence, onExisting.
    quiet = job(resources__gpuMemoryGiB=48, output__checkpointEverySteps=5, output__onExisting="resume")
    quiet.spec.suspend = True
    assert run_identity(quiet)["spec_hash"] == base["spec_hash"]
    # An explicit default equals an unset field.
    assert run_identity(job(training__seed=3407))["spec_hash"] == base["spec_hash"]
    for change in ({"training__learningRate": 1e-3}, {"model__maxSeqLength": 256}, {"dataset__packing": True},
                   {"model__source": "pvc://models/other"}, {"dataset__source": "pvc://data/b.jsonl"},
                   {"training__optimizer": "adamw_torch"}):
        assert run_identity(job(**change))["spec_hash"] != base["spec_hash"], change


def test_same_run_and_the_differences_named():
    a, b = run_identity(job()), run_identity(job(uid="u-2", training__learningRate=1e-3))
    assert same_run(a, run_identity(job())) and not same_run(a, b)
    assert not same_run(a, run_identity(job(uid="u-2"))), "a recreated FineTuneJob is another run"
    named = differences(a, b)
    assert named[0] == "metadata.uid u-1 -> u-2"
    assert "spec.training.learningRate 0.003 -> 0.001" in named


def _checkpoint(destination: Path, identity, step=10, shape=None):
    if shape:
        identity = {**identity, "model_shape": shape}
    manager = CheckpointManager(destination, keep=2, run=identity)
    with manager.writing(step, {"engine": "test"}) as staging:
        (staging / "model.safetensors").write_text("w")
    return manager


def test_another_runs_checkpoints_are_refused_resumed_or_moved_aside(tmp_path):
    mine = run_identity(job(uid="u-2", training__learningRate=1e-3))
    manager = _checkpoint(tmp_path, run_identity(job()))
    found = existing_run(tmp_path, manager.latest())
    assert decide(tmp_path, existing_run(tmp_path, manager.latest()), run_identity(job()), "refuse",
                  print) == "resume", "the same run resumes"
    with pytest.raises(OutputInUse) as refused:
        decide(tmp_path, found, mine, "refuse", print)
    text = str(refused.value)
    assert "checkpoints (newest step 10) of another run" in text and "learningRate 0.003 -> 0.001" in text
    assert "onExisting: resume" in text and "restart" in text
    assert len(f"OutputInUse: {text}".encode()) < 1000
    assert decide(tmp_path, found, mine, "resume", print) == "resume"
    # Another model shape cannot be resumed, even when asked to.
    other = _checkpoint(tmp_path / "shape", run_identity(job()), shape={"hidden_size": 64})
    with pytest.raises(OutputInUse, match="another model shape .hidden_size 64 -> 128"):
        decide(tmp_path / "shape", existing_run(tmp_path / "shape", other.latest()),
               {**mine, "model_shape": {"hidden_size": 128}}, "resume", print)
    # restart moves everything aside, deleting nothing.
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.safetensors").write_text("final")
    assert decide(tmp_path, found, mine, "restart", print) == "restarted"
    moved = list((tmp_path / SUPERSEDED_DIR).iterdir())
    assert len(moved) == 1 and (moved[0] / "model" / "model.safetensors").read_text() == "final"
    assert (moved[0] / "checkpoints" / "step-00000010" / COMPLETE_MARKER).is_file()
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "model").exists()


def test_a_finished_model_of_another_run_is_refused_too(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "summary.json").write_text(json.dumps({"steps": 30, "run": run_identity(job())}))
    found = existing_run(tmp_path, None)
    with pytest.raises(OutputInUse, match="holds a trained model of another run"):
        decide(tmp_path, found, run_identity(job(uid="u-2")), "refuse", print)
    # Checkpoints from before run identities: not resumed silently either.
    legacy = CheckpointManager(tmp_path / "legacy", keep=2)
    with legacy.writing(10, {}) as staging:
        (staging / "w").write_text("w")
    with pytest.raises(OutputInUse, match="older kubesloth"):
        decide(tmp_path / "legacy", existing_run(tmp_path / "legacy", legacy.latest()), run_identity(job()),
               "refuse", print)


# --- the lock ------------------------------------------------------------------------------------------------------
class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds


def test_lock_waits_for_a_fresh_holder_and_takes_over_a_stale_one(tmp_path):
    clock = FakeClock()
    lines = []
    first = OutputLock(tmp_path, {"pod": "old", "uid": "u-1", "pid": 1, "hostname": "a"}, heartbeat=10,
                       clock=clock, sleep=clock.sleep, max_wait=1000).acquire()
    assert first.held() and json.loads((tmp_path / LOCK_FILE).read_text())["pod"] == "old"

    # The old holder keeps beating for 100 s: the second waits all that time, then 60 s more (6 heartbeats).
    beats = {"until": clock.now + 100}

    def sleep(seconds):
        clock.sleep(seconds)
        if clock.now <= beats["until"]:
            first.beat()

    second = OutputLock(tmp_path, {"pod": "new", "uid": "u-1", "pid": 2, "hostname": "b"}, heartbeat=10,
                        clock=clock, sleep=sleep, log=lines.append, max_wait=1000)
    started = clock.now
    second.acquire()
    waited = clock.now - started
    assert 100 + 60 <= waited <= 100 + 60 + 2, waited
    assert second.held() and not first.held()
    assert any("held by pod old" in line and "waiting" in line for line in lines)
    assert any("taking over from pod old" in line for line in lines)
    # The old writer, if it comes back, can no longer commit.
    with pytest.raises(OutputInUse, match="taken over by pod new"):
        first.check_held("commit the checkpoint at step 20")
    assert first.beat() is False and "taken over" in first.lost
    second.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_lock_wait_is_bounded_and_a_signal_ends_it(tmp_path):
    clock = FakeClock()
    holder = OutputLock(tmp_path, {"pod": "a"}, heartbeat=10, clock=clock, sleep=clock.sleep).acquire()

    def beating(seconds):
        clock.sleep(seconds)
        holder.beat()

    waiter = OutputLock(tmp_path, {"pod": "b"}, heartbeat=10, clock=clock, sleep=beating, max_wait=120)
    with pytest.raises(OutputInUse, match="being written by another trainer: pod a"):
        waiter.acquire()
    stop = threading.Event()
    stop.set()
    with pytest.raises(Interrupted):
        OutputLock(tmp_path, {"pod": "c"}, heartbeat=10, clock=clock, sleep=beating, stop=stop).acquire()
    assert holder.held()


def test_a_writer_that_lost_the_lock_never_commits(tmp_path):
    clock = FakeClock()
    lock = OutputLock(tmp_path, {"pod": "a"}, heartbeat=10, clock=clock, sleep=clock.sleep).acquire()
    manager = CheckpointManager(tmp_path, keep=2, lock=lock, required=("optimizer.pt", "*.safetensors"))
    with pytest.raises(CheckpointLost, match="missing optimizer.pt"):  # e.g. its staging dir was deleted under it
        with manager.writing(10, {}) as staging:
            (staging / "model.safetensors").write_text("w")
    clock.now += 1000
    OutputLock(tmp_path, {"pod": "b"}, heartbeat=10, clock=clock, sleep=clock.sleep).acquire()  # stale: taken
    with pytest.raises(OutputInUse):
        with manager.writing(20, {}) as staging:
            (staging / "model.safetensors").write_text("w")
            (staging / "optimizer.pt").write_text("o")
    assert manager.complete() == []


# --- the manifest --------------------------------------------------------------------------------------------------
def test_a_complete_checkpoint_missing_a_file_is_partial(tmp_path):
    manager = CheckpointManager(tmp_path, keep=3)
    for step in (10, 20):
        with manager.writing(step, {}) as staging:
            (staging / "model.safetensors").write_text("weights" * step)
            (staging / "sub").mkdir()
            (staging / "sub" / "optimizer.pt").write_text("states")
    listed = json.loads((manager.path_for(20) / MANIFEST_FILE).read_text())["files"]
    assert listed["model.safetensors"] == 140 and listed["sub/optimizer.pt"] == 6
    assert manager.latest().step == 20
    (manager.path_for(20) / "sub" / "optimizer.pt").unlink()  # marked COMPLETE, a file gone
    assert manager.latest().step == 10, "a manifest mismatch is a partial checkpoint"
    (manager.path_for(10) / "model.safetensors").write_text("short")  # truncated
    assert manager.latest() is None
    assert set(manager.remove_partial()) == {manager.path_for(10), manager.path_for(20)}


# --- the deadline --------------------------------------------------------------------------------------------------
def test_deadline_decision():
    assert estimate_write_seconds(12.0, 10**9, None)[0] == 12.0, "the measured time wins"
    seconds, how = estimate_write_seconds(None, None, 2 * 10**9)
    assert seconds == 10.0 and "MB/s" in how
    assert interrupt_write_decision(None, 1e6) == (True, pytest.approx(1e6 * 1.25 + 5)), "no deadline known"
    assert interrupt_write_decision(30.0, 20.0)[0] is True
    assert interrupt_write_decision(29.0, 20.0)[0] is False  # 20 x 1.25 + 5 = 30 > 29

    clock = FakeClock()
    deadline = Deadline(60, clock=clock)
    assert deadline.seconds_left() is None
    deadline.signalled()
    clock.now += 20
    deadline.signalled()  # a second signal does not move it
    assert deadline.seconds_left() == 40


def test_interrupt_checkpoint_skipped_when_it_cannot_finish(tmp_path):
    clock = FakeClock()
    stop = threading.Event()
    manager = CheckpointManager(tmp_path, keep=2, deadline=Deadline(30, clock=clock), stop=stop)
    with manager.writing(10, {}) as staging:
        (staging / "w").write_text("w")
    manager.last_write_seconds = 40.0  # the last write was slow
    stop.set()
    manager.deadline.signalled()
    with pytest.raises(InterruptCheckpointSkipped):
        with manager.writing(13, {}) as staging:
            raise AssertionError("nothing is written")
    assert not manager.interrupt.written
    assert "interrupt checkpoint skipped" in manager.interrupt.message
    assert "the newest is step 10" in manager.interrupt.message
    assert [c.step for c in manager.complete()] == [10] and not manager.staging_root.exists()
    manager.last_write_seconds = 1.0
    manager.interrupt = None
    with manager.writing(14, {}) as staging:
        (staging / "w").write_text("w")
    assert manager.interrupt.written and manager.latest().step == 14


# --- the termination message's state -------------------------------------------------------------------------------
def test_state_rides_in_the_termination_message_under_1_kib():
    state = {"checkpoint": {"step": 20, "path": "checkpoints/step-00000020", "bytes": 123,
                            "time": "2026-12-01T10:00:00Z"}, "output": {"path": "model", "files": 6}}
    text = contract.with_state(contract.success_message(30, 30, 100, 5.0, 1.5, "/mnt/pvc/x/model"), state)
    assert contract.parse_state(text) == state
    assert contract.parse_success_message(text)["step"] == 30, "the success figures still parse"
    long = contract.with_state("Interrupted: " + "x" * 5000, state)
    assert len(long.encode()) <= 1000 and contract.parse_state(long) == state
    assert contract.strip_state(long).startswith("Interrupted: xxx")
    assert contract.parse_state("OutputInUse: no state") is None
    assert contract.parse_state("trainer died kubesloth-state={garbled") is None
