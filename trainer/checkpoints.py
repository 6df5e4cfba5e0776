"""Checkpoint directories under <destination>/checkpoints: written to a staging dir, renamed into place, and
only then marked COMPLETE. Only complete checkpoints are resumed; partial ones are deleted on start.

What goes into a checkpoint is the engine's business; the layout, atomicity, retention and the metadata file
(kubesloth-checkpoint.json) are shared so a manual-loop engine uses them the same way.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from kubesloth.api.contract import CHECKPOINT_PREFIX, CHECKPOINTS_DIR, COMPLETE_MARKER

METADATA_FILE = "kubesloth-checkpoint.json"
STAGING_DIR = ".staging"
_NAME = re.compile(rf"^{re.escape(CHECKPOINT_PREFIX)}(\d+)$")


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path

    def metadata(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / METADATA_FILE).read_text())
        except (OSError, ValueError):
            return {}


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
    def __init__(self, destination: Path, keep: int):
        self.root = destination / CHECKPOINTS_DIR
        self.keep = keep

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
        return [c for c in self._named() if (c.path / COMPLETE_MARKER).is_file()]

    def latest(self) -> Optional[Checkpoint]:
        done = self.complete()
        return done[-1] if done else None

    def remove_partial(self) -> list[Path]:
        """Delete checkpoint dirs without the marker and any staging leftovers (a kill mid-write)."""
        removed = [c.path for c in self._named() if not (c.path / COMPLETE_MARKER).is_file()]
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

    def commit(self, staging: Path, step: int, metadata: dict[str, Any]) -> Checkpoint:
        """Metadata into the staging dir, fsync, rename into place, then the COMPLETE marker, then retention."""
        final = self.path_for(step)
        if (final / COMPLETE_MARKER).is_file():  # e.g. interrupted right after resuming at this very step
            shutil.rmtree(staging, ignore_errors=True)
            return Checkpoint(step, final)
        shutil.rmtree(final, ignore_errors=True)
        (staging / METADATA_FILE).write_text(json.dumps({"step": step, **metadata}, indent=2, default=str))
        _fsync_tree(staging)
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
        self.prune()
        return Checkpoint(step, final)

    @contextmanager
    def writing(self, step: int, metadata: dict[str, Any]) -> Iterator[Path]:
        """For engines that write their own files: `with manager.writing(step, meta) as d: save into d`."""
        staging = self.new_staging_dir(step)
        try:
            yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self.commit(staging, step, metadata)

    def prune(self) -> list[Path]:
        done = self.complete()
        removed = [c.path for c in done[:-self.keep]] if len(done) > self.keep else []
        for path in removed:
            # Drop the marker first: a kill during rmtree leaves a partial, never a "complete" half.
            (path / COMPLETE_MARKER).unlink(missing_ok=True)
            shutil.rmtree(path, ignore_errors=True)
        return removed
