"""One run, one output; one writer at a time.

Run identity: every checkpoint (and summary.json) records the run it belongs to: the FineTuneJob's uid and a hash
of the spec fields that change training (`TRAINING_FIELDS`: the model source and maxSeqLength, the dataset, every
training field), plus the model's shape. A trainer that finds another run's checkpoints or model in its output
does what `spec.output.onExisting` says: refuse (exit 7, OutputInUse, naming the fields that differ), resume
(continue them when the model shape matches) or restart (move them aside to `superseded/`, never deleting).

The lock: `<destination>/.kubesloth-lock` names its holder (pod, FineTuneJob uid, pid, host, a random token) and a
heartbeat time a thread rewrites every `heartbeat` seconds. A trainer that finds a fresh lock of another holder
waits (logging) until it is released or its heartbeat is older than `stale_after`, then takes it over; it gives up
after `max_wait` (OutputInUse). Only the holder deletes partial checkpoints and `.staging`; a writer commits a
checkpoint only while the lock still names it (`check_held`). Pure where it can be: the clock and sleep are
injectable, and the unit tests drive the takeover with a fake clock.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from kubesloth.api.contract import (CHECKPOINTS_DIR, FINAL_MODEL_DIR, LOCK_FILE, SUMMARY_FILE, SUPERSEDED_DIR,
                                    Env)
from kubesloth.trainer.errors import OutputInUse

# Spec fields whose change makes another training run: a checkpoint of one is not silently resumed by the other.
# Not suspend, ttl, resources, output (where and how often to write), scheduling: they do not change the weights.
TRAINING_FIELDS = ("model.source", "model.maxSeqLength", "dataset", "training")
# config.json keys that decide whether a checkpoint's tensors fit the model (onExisting: resume).
SHAPE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "tie_word_embeddings", "head_dim")

HEARTBEAT_ENV = "KUBESLOTH_LOCK_HEARTBEAT_SECONDS"
DEFAULT_HEARTBEAT_SECONDS = 10.0
STALE_HEARTBEATS = 6  # a lock whose heartbeat is older than this many periods is stale (its holder is gone)
DEFAULT_GRACE_SECONDS = 600.0


# --- run identity ------------------------------------------------------------------------------------------------
def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key in sorted(value):
            _flatten(value[key], f"{prefix}.{key}", out)
    else:
        out[prefix] = value


def training_fields(spec_wire: dict[str, Any]) -> dict[str, Any]:
    """`spec.x.y -> value` of every field in TRAINING_FIELDS (defaults filled in: unset == the default)."""
    out: dict[str, Any] = {}
    for path in TRAINING_FIELDS:
        value: Any = spec_wire
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        _flatten(value, f"spec.{path}", out)
    return out


def spec_hash(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_shape(model_path: Optional[Path]) -> Optional[dict[str, Any]]:
    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return None
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    return {k: config.get(k, text.get(k)) for k in SHAPE_KEYS if config.get(k, text.get(k)) is not None}


def run_identity(job: Any, model_path: Optional[Path] = None) -> dict[str, Any]:
    """What a checkpoint records about the run that wrote it. `job`: the FineTuneJob (api.v1alpha1)."""
    meta = job.metadata or {}
    fields = training_fields(job.spec.model_dump(by_alias=True, mode="json"))
    identity = {"uid": meta.get("uid"), "job": f"{meta.get('namespace', '-')}/{meta.get('name', '-')}",
                "spec_hash": spec_hash(fields), "fields": fields}
    shape = model_shape(model_path)
    if shape:
        identity["model_shape"] = shape
    return identity


def same_run(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """The same FineTuneJob (uid; a job run by hand has none: its namespace/name) with the same training fields."""
    who_a = a.get("uid") or a.get("job")
    who_b = b.get("uid") or b.get("job")
    return who_a == who_b and a.get("spec_hash") == b.get("spec_hash")


def _short(value: Any, limit: int = 40) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[:limit - 1] + "…"


def differences(found: dict[str, Any], mine: dict[str, Any], limit: int = 6) -> list[str]:
    """What differs, for a person: metadata.uid and each training field (old -> new), at most `limit` named."""
    out = []
    if (found.get("uid") or found.get("job")) != (mine.get("uid") or mine.get("job")):
        out.append(f"metadata.uid {found.get('uid') or found.get('job')} -> {mine.get('uid') or mine.get('job')}")
    a, b = found.get("fields") or {}, mine.get("fields") or {}
    changed = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if not a and found.get("spec_hash") != mine.get("spec_hash"):
        out.append("the training fields (spec hash)")
    out += [f"{k} {_short(a.get(k))} -> {_short(b.get(k))}" for k in changed[:limit]]
    if len(changed) > limit:
        out.append(f"+{len(changed) - limit} more")
    return out


def shape_differences(found: dict[str, Any], mine: dict[str, Any]) -> list[str]:
    a, b = found.get("model_shape") or {}, mine.get("model_shape") or {}
    if not a or not b:
        return []
    return [f"{k} {a.get(k)} -> {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


@dataclass
class Existing:
    """What an output already holds of some run: its newest complete checkpoint (or its finished model)."""

    what: str  # "checkpoint step 20" | "model"
    run: Optional[dict[str, Any]]  # None: written before checkpoints recorded their run


def existing_run(destination: Path, newest_checkpoint: Any) -> Optional[Existing]:
    if newest_checkpoint is not None:
        return Existing(f"checkpoints (newest step {newest_checkpoint.step})",
                        newest_checkpoint.metadata().get("run"))
    if (destination / FINAL_MODEL_DIR).exists() or (destination / SUMMARY_FILE).exists():
        try:
            summary = json.loads((destination / SUMMARY_FILE).read_text())
        except (OSError, ValueError):
            summary = {}
        return Existing("a trained model", summary.get("run") if isinstance(summary, dict) else None)
    return None


def move_aside(destination: Path, found: Existing, clock: Callable[[], float] = time.time) -> Path:
    """onExisting: restart: checkpoints/, model/ and summary.json into superseded/<time>-<uid>/ (renames on the
    same volume: nothing is copied or deleted)."""
    who = ((found.run or {}).get("uid") or "unknown")[:8]
    target = destination / SUPERSEDED_DIR / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(clock()))}-{who}"
    suffix = 0
    while target.exists():
        suffix += 1
        target = target.with_name(f"{target.name.split('.')[0]}.{suffix}")
    target.mkdir(parents=True)
    for name in (CHECKPOINTS_DIR, FINAL_MODEL_DIR, SUMMARY_FILE):
        if (destination / name).exists():
            os.rename(destination / name, target / name)
    return target


def decide(destination: Path, found: Optional[Existing], mine: dict[str, Any], on_existing: str,
           log: Callable[[str], None]) -> str:
    """What to do with what the output holds: "fresh" (nothing there), "resume" (this run's, or another's with
    onExisting: resume) or "restarted" (moved aside). Raises OutputInUse when it must not be used."""
    if found is None:
        return "fresh"
    if found.run is not None and same_run(found.run, mine):
        return "resume"
    where = f"spec.output.destination ({destination}) holds {found.what}"
    if found.run is None:
        whose = "written by an older kubesloth that did not record its run"
        diff: list[str] = []
    else:
        whose = f"of another run (FineTuneJob {found.run.get('job')})"
        diff = differences(found.run, mine)
    differs = f"; differs in: {'; '.join(diff)}" if diff else ""
    if on_existing == "restart":
        target = move_aside(destination, found)
        log(f"onExisting restart: {where} {whose}{differs}; moved them to {target}, starting fresh")
        return "restarted"
    if on_existing == "resume":
        shape = shape_differences(found.run or {}, mine)
        if shape:
            raise OutputInUse(f"{where} {whose} for another model shape ({', '.join(shape)}): onExisting resume "
                              "cannot load it; set spec.output.onExisting: restart (moves them aside) or use "
                              "another destination")
        log(f"onExisting resume: continuing {found.what} {whose}{differs}")
        return "resume"
    raise OutputInUse(f"{where} {whose}{differs}; not resumed. To continue them (same model shape) set "
                      "spec.output.onExisting: resume; to move them aside to superseded/ and start fresh: restart; "
                      "or use another destination")


# --- the lock ----------------------------------------------------------------------------------------------------
def heartbeat_seconds() -> float:
    try:
        return float(os.environ.get(HEARTBEAT_ENV) or DEFAULT_HEARTBEAT_SECONDS)
    except ValueError:
        return DEFAULT_HEARTBEAT_SECONDS


def grace_seconds() -> float:
    try:
        return float(os.environ.get(Env.TERMINATION_GRACE_SECONDS.value) or DEFAULT_GRACE_SECONDS)
    except ValueError:
        return DEFAULT_GRACE_SECONDS


def holder_from_env(uid: Optional[str]) -> dict[str, Any]:
    host = socket.gethostname()
    return {"pod": os.environ.get("HOSTNAME") or host, "uid": uid, "pid": os.getpid(), "hostname": host}


@dataclass
class OutputLock:
    """`<destination>/.kubesloth-lock`. `acquire()` waits for another fresh holder; a thread keeps the heartbeat."""

    destination: Path
    holder: dict[str, Any]
    heartbeat: float = DEFAULT_HEARTBEAT_SECONDS
    stale_after: Optional[float] = None  # default STALE_HEARTBEATS x heartbeat
    max_wait: Optional[float] = None  # default: the grace period (the old pod's time to stop) + 2 x stale_after
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep
    log: Callable[[str], None] = lambda line: None
    stop: Optional[threading.Event] = None  # SIGTERM while waiting: give up (Interrupted, nothing to save)
    token: str = field(default_factory=lambda: secrets.token_hex(8))
    lost: Optional[str] = None
    _thread: Optional[threading.Thread] = None
    _done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self):
        self.stale_after = self.stale_after or STALE_HEARTBEATS * self.heartbeat
        if self.max_wait is None:
            self.max_wait = grace_seconds() + 2 * self.stale_after

    @property
    def path(self) -> Path:
        return self.destination / LOCK_FILE

    def read(self) -> Optional[dict[str, Any]]:
        try:
            found = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"token": None, "heartbeat_at": 0}  # garbled: stale by definition
        return found if isinstance(found, dict) else {"token": None, "heartbeat_at": 0}

    def _write(self, acquired_at: float) -> None:
        body = {**self.holder, "token": self.token, "acquired_at": acquired_at, "heartbeat_at": self.clock(),
                "heartbeat_seconds": self.heartbeat}
        tmp = self.path.with_name(f"{LOCK_FILE}.{self.token}.tmp")
        tmp.write_text(json.dumps(body))
        os.replace(tmp, self.path)

    def _create(self) -> bool:
        """Write the lock only if there is none: a complete file hard-linked into place (atomic, and never seen
        empty by another starter)."""
        body = {**self.holder, "token": self.token, "acquired_at": self.clock(), "heartbeat_at": self.clock(),
                "heartbeat_seconds": self.heartbeat}
        tmp = self.path.with_name(f"{LOCK_FILE}.{self.token}.tmp")
        tmp.write_text(json.dumps(body))
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            return False
        except OSError:  # a volume without hard links: last writer wins, _confirm() decides
            os.replace(tmp, self.path)
            return True
        finally:
            tmp.unlink(missing_ok=True)
        return True

    @staticmethod
    def describe(found: dict[str, Any]) -> str:
        return (f"pod {found.get('pod', '?')} (FineTuneJob uid {found.get('uid') or '-'}, pid "
                f"{found.get('pid', '?')} on {found.get('hostname', '?')})")

    def age(self, found: dict[str, Any]) -> float:
        try:
            return self.clock() - float(found.get("heartbeat_at") or 0)
        except (TypeError, ValueError):
            return float("inf")

    def acquire(self) -> "OutputLock":
        from kubesloth.trainer.errors import Interrupted

        started = self.clock()
        last_log = -1e18
        while True:
            found = self.read()
            if found is None:
                if self._create() and self._confirm():
                    return self
                continue
            if found.get("token") == self.token:
                return self
            age = self.age(found)
            if age > self.stale_after:
                self.log(f"output lock {self.path}: taking over from {self.describe(found)}, whose heartbeat is "
                         f"{age:.0f}s old (stale after {self.stale_after:.0f}s)")
                self._write(self.clock())
                if self._confirm():
                    return self
                continue
            waited = self.clock() - started
            if waited >= self.max_wait:
                raise OutputInUse(
                    f"spec.output.destination ({self.destination}) is being written by another trainer: "
                    f"{self.describe(found)}, heartbeat {age:.0f}s ago; waited {waited:.0f}s (two trainers never "
                    "write one output at once: stop the other, or use another destination)")
            if self.clock() - last_log >= 30 or last_log < -1e17:
                last_log = self.clock()
                self.log(f"output lock {self.path} is held by {self.describe(found)}, heartbeat {age:.0f}s ago: "
                         f"waiting (until it is released or {self.stale_after:.0f}s stale; at most "
                         f"{self.max_wait - waited:.0f}s more)")
            if self.stop is not None and self.stop.is_set():
                raise Interrupted("stopped while waiting for the output lock; nothing new to checkpoint; resumable")
            self.sleep(min(1.0, self.heartbeat / 2))

    def _confirm(self) -> bool:
        """After writing: another taker racing us may have written last; the file's token decides."""
        self.sleep(min(0.2, self.heartbeat / 10))
        found = self.read()
        return bool(found) and found.get("token") == self.token

    def held(self) -> bool:
        found = self.read()
        return bool(found) and found.get("token") == self.token

    def check_held(self, doing: str) -> None:
        found = self.read()
        if not found or found.get("token") != self.token:
            self.lost = (f"the output lock was taken over by {self.describe(found)}" if found
                         else "the output lock file was removed")
            raise OutputInUse(f"cannot {doing}: {self.lost}; this trainer stops without writing")

    def beat(self) -> bool:
        """One heartbeat; False (and `lost` set) when the lock is no longer ours."""
        found = self.read()
        if not found or found.get("token") != self.token:
            self.lost = self.lost or (f"the output lock was taken over by {self.describe(found)}" if found
                                      else "the output lock file was removed")
            return False
        self._write(float(found.get("acquired_at") or self.clock()))
        return True

    def start_heartbeat(self) -> "OutputLock":
        def loop():
            while not self._done.wait(self.heartbeat):
                try:
                    if not self.beat():
                        self.log(f"output lock lost: {self.lost}")
                        return
                except OSError as exc:
                    self.log(f"output lock heartbeat failed: {exc}")
        self._thread = threading.Thread(target=loop, name="kubesloth-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            if self.held():
                self.path.unlink()
        except OSError:
            pass


def claim_output(destination: Path, job: Any, model_path: Path, stop: threading.Event,
                 log: Callable[[str], None]) -> tuple[OutputLock, dict[str, Any], str]:
    """Take the output's lock (waiting for another writer), then decide about what it holds. Returns the held
    lock (heartbeat running), this run's identity and the decision (fresh / resume / restarted)."""
    from kubesloth.trainer.checkpoints import CheckpointManager

    identity = run_identity(job, model_path)
    lock = OutputLock(destination, holder_from_env(identity.get("uid")), heartbeat=heartbeat_seconds(), log=log,
                      stop=stop)
    lock.acquire()
    lock.start_heartbeat()
    try:
        manager = CheckpointManager(destination, job.spec.output.checkpoints_to_keep)
        for path in manager.remove_partial():
            log(f"removed staging leftovers {path}" if path == manager.staging_root
                else f"removed partial checkpoint {path} (no COMPLETE marker, or files not matching its manifest)")
        found = existing_run(destination, manager.latest())
        decision = decide(destination, found, identity, str(job.spec.output.on_existing), log)
    except BaseException:
        lock.release()
        raise
    return lock, identity, decision
