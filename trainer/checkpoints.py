"""Checkpoint directories under <destination>/checkpoints: written to a staging dir, renamed into place, and
only then marked COMPLETE. Only complete checkpoints are resumed; partial ones are deleted on start.

What goes into a checkpoint is the engine's business; the layout, atomicity, retention, the metadata file
(kubesloth-checkpoint.json: the run it belongs to, the write time and size) and the manifest
(kubesloth-manifest.json: every file's name and size, written before the COMPLETE marker and checked on load: a
mismatch is a partial checkpoint) are shared so a manual-loop engine uses them the same way.

The interrupt checkpoint (SIGTERM) is written only when it can finish before the kubelet's SIGKILL:
`interrupt_checkpoint_fits` compares the estimated write time with what is left of the grace period
(`Deadline`, from KUBESLOTH_TERMINATION_GRACE_SECONDS); when it cannot, the engine stops without starting it.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from kubesloth.api.contract import CHECKPOINT_PREFIX, CHECKPOINTS_DIR, COMPLETE_MARKER, Env

METADATA_FILE = "kubesloth-checkpoint.json"
MANIFEST_FILE = "kubesloth-manifest.json"
STAGING_DIR = ".staging"
_NAME = re.compile(rf"^{re.escape(CHECKPOINT_PREFIX)}(\d+)$")
# Test-only: sleep this long inside every checkpoint commit (a slow volume, on purpose).
TEST_DELAY_ENV = "KUBESLOTH_TEST_CHECKPOINT_DELAY_SECONDS"
# Test-only: sleep this long inside the commit of the interrupt checkpoint only (a write slower than its estimate).
TEST_INTERRUPT_DELAY_ENV = "KUBESLOTH_TEST_INTERRUPT_CHECKPOINT_DELAY_SECONDS"
# Writing a checkpoint whose time was never measured: its size over this (conservative) bandwidth.
CONSERVATIVE_WRITE_BYTES_PER_SECOND = 200e6
# The interrupt checkpoint starts only if estimate x WRITE_MARGIN + EXIT_ALLOWANCE_SECONDS fits in the time left.
WRITE_MARGIN = 1.25
EXIT_ALLOWANCE_SECONDS = 5.0


class CheckpointLost(RuntimeError):
    """A commit that must not happen: the output lock was taken over, or files are missing."""


class InterruptCheckpointSkipped(Exception):
    """Raised by `writing()` for an interrupt checkpoint that cannot finish before SIGKILL: nothing was written.
    The recipe turns it into an interrupted result (for engines that checkpoint through `writing()`)."""

    def __init__(self, step: int):
        super().__init__(f"interrupt checkpoint at step {step} skipped")
        self.step = step


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path

    def metadata(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / METADATA_FILE).read_text())
        except (OSError, ValueError):
            return {}

    def problem(self) -> Optional[str]:
        """Why this directory is not a complete checkpoint, or None: the marker and a manifest that matches the
        files (a checkpoint written before manifests existed has none and counts by its marker alone)."""
        if not (self.path / COMPLETE_MARKER).is_file():
            return "no COMPLETE marker"
        return verify_manifest(self.path)


def tree_files(path: Path) -> dict[str, int]:
    """relative path -> size of every file under `path` (the manifest and the marker left out)."""
    files = {}
    for file in sorted(path.rglob("*")):
        rel = file.relative_to(path).as_posix()
        if file.is_file() and rel not in (MANIFEST_FILE, COMPLETE_MARKER):
            files[rel] = file.stat().st_size
    return files


def write_manifest(path: Path) -> dict[str, int]:
    files = tree_files(path)
    (path / MANIFEST_FILE).write_text(json.dumps({"files": files}, indent=1, sort_keys=True))
    return files


def verify_manifest(path: Path) -> Optional[str]:
    """None when every file the manifest names is there with its size; else what is wrong."""
    try:
        listed = json.loads((path / MANIFEST_FILE).read_text())["files"]
    except FileNotFoundError:
        return None  # written before manifests: the marker alone
    except (OSError, ValueError, KeyError, TypeError):
        return "unreadable manifest"
    for name, size in listed.items():
        try:
            actual = (path / name).stat().st_size
        except OSError:
            return f"{name} missing (manifest)"
        if actual != size:
            return f"{name} is {actual} bytes, the manifest says {size}"
    return None


@dataclass
class Deadline:
    """When SIGKILL comes: the pod's grace period (KUBESLOTH_TERMINATION_GRACE_SECONDS) from the first signal."""

    grace_seconds: Optional[float] = None
    clock: Callable[[], float] = time.monotonic
    signalled_at: Optional[float] = None

    @classmethod
    def from_env(cls) -> "Deadline":
        raw = os.environ.get(Env.TERMINATION_GRACE_SECONDS.value, "")
        try:
            return cls(float(raw) if raw else None)
        except ValueError:
            return cls(None)

    def signalled(self) -> None:
        if self.signalled_at is None:
            self.signalled_at = self.clock()

    def seconds_left(self) -> Optional[float]:
        if self.grace_seconds is None or self.signalled_at is None:
            return None
        return self.grace_seconds - (self.clock() - self.signalled_at)


def estimate_write_seconds(last_seconds: Optional[float], last_bytes: Optional[int], expected_bytes: Optional[int],
                           bandwidth: float = CONSERVATIVE_WRITE_BYTES_PER_SECOND) -> tuple[float, str]:
    """(seconds, how): the last checkpoint's measured write time, else its (or the expected) size over a
    conservative bandwidth."""
    if last_seconds is not None and last_seconds > 0:
        return last_seconds, f"the last checkpoint took {last_seconds:.1f}s to write"
    size = last_bytes or expected_bytes
    if size:
        return size / bandwidth, f"{size / 2**20:.0f} MiB at {bandwidth / 1e6:.0f} MB/s"
    return 0.0, "size unknown"


def interrupt_write_decision(seconds_left: Optional[float], estimate: float) -> tuple[bool, float]:
    """(write it?, seconds needed): write unless estimate x margin + the exit allowance overruns the time left."""
    need = estimate * WRITE_MARGIN + EXIT_ALLOWANCE_SECONDS
    return (seconds_left is None or need <= seconds_left), need


@dataclass
class InterruptOutcome:
    step: int
    written: bool
    message: str


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with file.open("rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(path)


class CheckpointManager:
    """`run`: the run identity recorded in every checkpoint (trainer/output.py); `lock`: the output's lease,
    checked before each commit (a writer that lost it never commits); `required`: file patterns a checkpoint must
    hold to be committed; `deadline` + `expected_bytes`: for the interrupt checkpoint's decision."""

    def __init__(self, destination: Path, keep: int, run: Optional[dict[str, Any]] = None, lock: Any = None,
                 required: tuple[str, ...] = (), deadline: Optional[Deadline] = None,
                 expected_bytes: Optional[int] = None, log: Callable[[str], None] = lambda line: None,
                 stop: Any = None, on_interrupt_write: Optional[Callable[["InterruptOutcome"], None]] = None):
        self.root = destination / CHECKPOINTS_DIR
        self.destination = destination
        self.keep = keep
        self.run, self.lock, self.required = run, lock, required
        self.deadline = deadline or Deadline()
        self.expected_bytes = expected_bytes
        self.log = log
        self.stop = stop  # the SIGTERM event: a write while it is set is the interrupt checkpoint
        self.last_write_seconds: Optional[float] = None
        self.last_write_bytes: Optional[int] = None
        self.interrupt: Optional[InterruptOutcome] = None
        # Called before the interrupt checkpoint's write starts: the trainer leaves a termination message saying
        # so, which stands if SIGKILL cuts the write (status: the interrupt checkpoint was lost).
        self.on_interrupt_write = on_interrupt_write

    @property
    def staging_root(self) -> Path:
        return self.root / STAGING_DIR

    def path_for(self, step: int) -> Path:
        return self.root / f"{CHECKPOINT_PREFIX}{step:08d}"

    def _named(self) -> list[Checkpoint]:
        if not self.root.is_dir():
            return []
        found = []
        for entry in self.root.iterdir():
            match = _NAME.match(entry.name)
            if match and entry.is_dir():
                found.append(Checkpoint(int(match[1]), entry))
        return sorted(found, key=lambda c: c.step)

    def complete(self) -> list[Checkpoint]:
        return [c for c in self._named() if c.problem() is None]

    def latest(self) -> Optional[Checkpoint]:
        done = self.complete()
        return done[-1] if done else None

    def remove_partial(self) -> list[Path]:
        """Delete checkpoint dirs without the marker (or whose files do not match their manifest) and any staging
        leftovers (a kill mid-write). Only while holding the output's lock: another writer's staging is its own."""
        removed = [c.path for c in self._named() if c.problem() is not None]
        if self.staging_root.exists():
            removed.append(self.staging_root)
        for path in removed:
            shutil.rmtree(path, ignore_errors=True)
        return removed

    def new_staging_dir(self, step: int) -> Path:
        path = self.staging_root / f"{CHECKPOINT_PREFIX}{step:08d}"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def commit(self, staging: Path, step: int, metadata: dict[str, Any],
               started: Optional[float] = None) -> Checkpoint:
        """Metadata and manifest into the staging dir, fsync, rename into place, then the COMPLETE marker, then
        retention. `started` (time.monotonic()) is when the engine began writing the files: the write time is
        measured from there (else from this call) and recorded for the interrupt checkpoint's estimate."""
        started = time.monotonic() if started is None else started
        final = self.path_for(step)
        if Checkpoint(step, final).problem() is None:  # e.g. interrupted right after resuming at this very step
            shutil.rmtree(staging, ignore_errors=True)
            return Checkpoint(step, final)
        delay = float(os.environ.get(TEST_DELAY_ENV) or 0)
        if self.stop is not None and self.stop.is_set():
            delay += float(os.environ.get(TEST_INTERRUPT_DELAY_ENV) or 0)
        if delay > 0:
            time.sleep(delay)
        self._check_can_commit(staging, step)
        shutil.rmtree(final, ignore_errors=True)
        size = sum(tree_files(staging).values())
        extra = {"run": self.run} if self.run is not None else {}
        seconds = time.monotonic() - started
        (staging / METADATA_FILE).write_text(json.dumps(
            {"step": step, **metadata, **extra, "write_seconds": round(seconds, 3), "bytes": size},
            indent=2, default=str))
        write_manifest(staging)
        _fsync_tree(staging)
        self._check_can_commit(staging, step)
        os.rename(staging, final)
        _fsync_dir(self.root)
        try:
            self.staging_root.rmdir()  # only when empty
        except OSError:
            pass
        marker = final / COMPLETE_MARKER
        with marker.open("w") as handle:
            handle.write(json.dumps({"step": step, "time": time.time()}) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        _fsync_dir(final)
        self.last_write_seconds = time.monotonic() - started
        self.last_write_bytes = size
        self.prune()
        return Checkpoint(step, final)

    def _check_can_commit(self, staging: Path, step: int) -> None:
        missing = [p for p in self.required if not any(fnmatch.fnmatch(f, p) for f in tree_files(staging))]
        if missing:
            raise CheckpointLost(f"checkpoint at step {step} is missing {', '.join(missing)} in {staging}: "
                                 "not marked COMPLETE")
        if self.lock is not None:
            self.lock.check_held(f"commit the checkpoint at step {step}")

    def interrupt_checkpoint_fits(self, step: int) -> bool:
        """Called by the engine after the step a SIGTERM interrupted, before it writes the interrupt checkpoint:
        True to write it; False when it cannot finish before SIGKILL (the engine stops without starting it, and
        `self.interrupt` says why: the termination message carries it)."""
        latest = self.latest()
        meta = latest.metadata() if latest else {}
        last_seconds = self.last_write_seconds if self.last_write_seconds is not None else meta.get("write_seconds")
        last_bytes = self.last_write_bytes or meta.get("bytes")
        estimate, how = estimate_write_seconds(last_seconds, last_bytes, self.expected_bytes)
        left = self.deadline.seconds_left()
        write, need = interrupt_write_decision(left, estimate)
        newest = f"the newest is step {latest.step}" if latest else "there is no complete checkpoint"
        if write:
            self.interrupt = InterruptOutcome(step, True, f"interrupt checkpoint at step {step}")
            if left is not None:
                self.log(f"interrupt checkpoint at step {step}: ~{estimate:.1f}s to write ({how}), "
                         f"{left:.1f}s of the grace period left")
            if self.on_interrupt_write is not None:
                self.on_interrupt_write(self.interrupt)
        else:
            self.interrupt = InterruptOutcome(step, False, (
                f"interrupt checkpoint skipped: writing it needs ~{need:.0f}s ({how}, with margin) and "
                f"{max(left, 0):.0f}s of the {self.deadline.grace_seconds:.0f}s grace period were left; {newest}"))
            self.log(self.interrupt.message)
        return write

    @contextmanager
    def writing(self, step: int, metadata: dict[str, Any]) -> Iterator[Path]:
        """For engines that write their own files: `with manager.writing(step, meta) as d: save into d`."""
        if self.stop is not None and self.stop.is_set():
            decided = self.interrupt if self.interrupt is not None and self.interrupt.step == step else None
            if not (decided.written if decided else self.interrupt_checkpoint_fits(step)):
                raise InterruptCheckpointSkipped(step)
        started = time.monotonic()
        staging = self.new_staging_dir(step)
        try:
            yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self.commit(staging, step, metadata, started=started)

    def state(self) -> Optional[dict[str, Any]]:
        """The newest complete checkpoint for the termination message (status.checkpoint)."""
        latest = self.latest()
        if latest is None:
            return None
        meta = latest.metadata()
        try:
            when = json.loads((latest.path / COMPLETE_MARKER).read_text()).get("time")
        except (OSError, ValueError, AttributeError):
            when = None
        out: dict[str, Any] = {"step": latest.step,
                               "path": latest.path.relative_to(self.destination).as_posix()}
        if isinstance(when, (int, float)):
            out["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))
        if isinstance(meta.get("bytes"), int):
            out["bytes"] = meta["bytes"]
        return out

    def prune(self) -> list[Path]:
        done = self.complete()
        removed = [c.path for c in done[:-self.keep]] if len(done) > self.keep else []
        for path in removed:
            # Drop the marker first: a kill during rmtree leaves a partial, never a "complete" half.
            (path / COMPLETE_MARKER).unlink(missing_ok=True)
            shutil.rmtree(path, ignore_errors=True)
        return removed
