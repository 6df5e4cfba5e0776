"""`python -m kubesloth.trainer`: the code path every trainer pod runs.

Order matters: the config, the engine choice, the destination and the sources are checked before torch is
imported, so bad input exits with its code within a second or two; then setup -> train -> save.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Optional

from kubesloth.api import contract
from kubesloth.api.contract import EXIT_REASONS, TERMINATION_LOG, Env, ExitCode
from kubesloth.trainer.checkpoints import Deadline
from kubesloth.trainer.config import config_path, load_job
from kubesloth.trainer.errors import (BadConfig, Interrupted, OutOfMemory, OutputUnwritable, SourceNotFound,
                                      TrainerFailure)

MAX_MESSAGE_BYTES = 1000
# A failed write with less free space than this at the destination is reported as a full disk.
DISK_FULL_BELOW_BYTES = 16 * 2**20


def log(line: str) -> None:
    from kubesloth.trainer.callbacks import emit  # `[trainer] LINE`, or JSON with KUBESLOTH_LOG_FORMAT=json

    emit(line)


def clean_message(message: str) -> str:
    """One line, under 1 KiB, never the token."""
    token = os.environ.get(Env.HF_TOKEN.value)
    if token:
        message = message.replace(token, "***")
    line = " ".join(message.split())
    encoded = line.encode()
    if len(encoded) > MAX_MESSAGE_BYTES:
        line = encoded[:MAX_MESSAGE_BYTES - 3].decode(errors="ignore") + "..."
    return line


def write_termination_log(message: str) -> None:
    path = Path(os.environ.get(Env.TERMINATION_LOG.value) or TERMINATION_LOG)
    try:
        path.write_text(message + "\n")
    except OSError:
        pass  # outside a pod (or a read-only path): the log line is enough


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text.lower()
                                              or "DefaultCPUAllocator: can't allocate memory" in text)


def disk_full(exc: BaseException, destination: Path) -> Optional[str]:
    """Why a write failed for lack of room, if it did. torch.save on a full disk raises a RuntimeError ("unexpected
    pos ...") with no errno, so the destination's free space is checked too."""
    import errno
    import shutil

    seen: Optional[BaseException] = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return "disk full" if seen.errno == errno.ENOSPC else "quota exceeded"
        seen = seen.__cause__ or seen.__context__
    try:
        free = shutil.disk_usage(destination).free
    except OSError:
        return None
    return f"disk full ({free / 2**20:.1f} MiB free)" if free < DISK_FULL_BELOW_BYTES else None


def metrics_port_ok() -> None:
    value = os.environ.get(Env.METRICS_PORT.value)
    if value and not (value.isdigit() and 0 <= int(value) <= 65535):
        raise BadConfig(f"{Env.METRICS_PORT.value}={value!r} is not a port number (0 turns metrics off)")


def model_shape(model_path: Path, profile: str):
    """The model's shape from its config.json, for the planner. auto/lean/fast need it (the plan decides the
    layout); custom runs as given and only loses the estimate."""
    from kubesloth.planner import ModelShape, ShapeError

    try:
        return ModelShape.from_file(model_path / "config.json")
    except ShapeError as err:
        if profile == "custom":
            log(f"no memory plan: {err}")
            return None
        if not (model_path / "config.json").is_file():
            raise SourceNotFound(f"spec.model.source: {err}") from None
        raise BadConfig(f"spec.model.source: {err}; profile {profile} plans the run from the model's shape "
                        "(use profile custom to run it without a plan)") from None


def operator_budget() -> Optional[int]:
    """The budget the operator planned with when it came from its GPU table (resources.gpuProduct)."""
    raw = os.environ.get(Env.GPU_BUDGET_BYTES.value)
    return int(raw) if raw and raw.isdigit() else None


def card_free_bytes() -> Optional[int]:
    import torch

    from kubesloth.trainer.memory import set_cuda_allocator_settings

    if not torch.cuda.is_available():
        return None
    set_cuda_allocator_settings()  # mem_get_info initialises CUDA: the allocator settings are read now
    return int(torch.cuda.mem_get_info()[0])


def run(config: Optional[str], stop: threading.Event, deadline: Optional[Deadline] = None,
        facts: Optional[dict] = None) -> str:
    """Returns the success message; raises TrainerFailure (or anything) on failure. `facts` gets what the
    termination message's state carries (api.contract.with_state: status.checkpoint / status.output)."""
    facts = {} if facts is None else facts
    from kubesloth.trainer.engines import choose_engine, requested_engine, runs_on_gpu
    from kubesloth.trainer.profiles import resolve_run
    from kubesloth.trainer.save import check_results_config, check_writable, weights_bytes
    from kubesloth.trainer.sources import resolve_dataset, resolve_destination, resolve_model

    path = config_path(config)
    job = load_job(path)
    spec = job.spec
    log(f"config {path}: FineTuneJob {job.metadata.get('namespace', '-')}/{job.metadata.get('name', '-')}")
    requested = requested_engine()
    metrics_port_ok()
    check_results_config(spec)  # reportTo packages installed, a pushToHub token
    destination = resolve_destination(spec.output.destination)
    check_writable(destination)
    model_path = resolve_model(spec.model.source)
    dataset_files = resolve_dataset(spec.dataset)  # a sources.DatasetSource; its records are read here, before torch
    from kubesloth.trainer.data import load_records
    records = load_records(dataset_files, spec.dataset.max_samples)
    check_writable(destination, need_bytes=weights_bytes(model_path))
    log(f"model {model_path}; dataset {dataset_files}: {len(records)} records; output {destination}")
    if stop.is_set():
        raise Interrupted("stopped before training started; nothing new to checkpoint; resumable")
    from kubesloth.trainer.output import claim_output

    # One writer per output (the lock), one run per output (the identity in its checkpoints): before any heavy
    # import, so a refusal is quick.
    lock, identity, decision = claim_output(destination, job, model_path, stop, log)
    facts["lock"] = lock
    log(f"output {destination}: lock held ({lock.describe(lock.holder)}); "
        f"run {identity.get('uid') or identity['job']} spec {identity['spec_hash']}: {decision}")

    engine_name = choose_engine(requested, profile=str(spec.training.profile))
    on_gpu = runs_on_gpu(engine_name)
    shape = model_shape(model_path, str(spec.training.profile))
    run = resolve_run(spec, shape, engine_name, on_gpu, budget_bytes=operator_budget(),
                      card_free_bytes=card_free_bytes() if on_gpu else None)
    hp, plan = run.hp, run.plan
    if plan is not None:
        log(f"plan {json.dumps(plan.summary(), sort_keys=True)}")
        log(f"plan: {plan.describe()}")
        for change in plan.changes:
            log(f"plan: {change.field}={change.value}: {change.planned} ({change.reason})")
        if plan.fits is False and on_gpu:
            raise BadConfig(f"{plan.reason_field}: the run does not fit: {plan.reason}; "
                            + "; or ".join(s.message for s in plan.suggestions))
    for note in hp.notes:
        log(note)
    log(f"engine {engine_name}; profile {hp.profile}: batch {hp.per_device_batch_size} x accumulation "
        f"{hp.gradient_accumulation_steps}, optimizer {hp.optimizer}, checkpointing {hp.gradient_checkpointing}, "
        f"lr {hp.learning_rate:g} ({hp.lr_scheduler}, warm-up {hp.warmup_ratio:g}), "
        f"maxSeqLength {hp.max_seq_length}, packing {hp.packing}")

    from kubesloth.trainer.recipe import Recipe, out_of_memory_advice

    def interrupt_write_started(outcome) -> None:
        # Stands as the pod's last words if SIGKILL cuts the write: the interrupt checkpoint was lost (the final
        # message replaces it when the write finishes).
        write_termination_log(contract.with_state(*lost_interrupt_message(recipe, outcome)))

    recipe = Recipe(job, hp, engine_name, model_path, dataset_files, destination, stop, log, plan=plan,
                    run_identity=identity, lock=lock, deadline=deadline, on_interrupt_write=interrupt_write_started)
    facts["recipe"] = recipe
    try:
        try:
            recipe.setup()
            result = recipe.train()
            if result.interrupted:
                raise Interrupted(interrupted_message(recipe, result, facts))
            saved, summary = recipe.save(result)
            facts["output"] = {"path": saved.path.relative_to(destination).as_posix(), "files": saved.files,
                               "bytes": saved.bytes, "verified": True}
        except TrainerFailure:
            raise
        except Exception as exc:
            if is_out_of_memory(exc):
                step = recipe.run_state.step
                raise OutOfMemory(f"out of memory at step {step + 1} ({type(exc).__name__}); "
                                  f"{recipe.memory_peaks()}; {out_of_memory_advice(plan)}") from exc
            full = disk_full(exc, destination)
            if full:
                raise OutputUnwritable(f"spec.output.destination: {full} while writing under {destination} "
                                       f"at step {recipe.run_state.step} ({type(exc).__name__}: "
                                       f"{str(exc)[:200]})") from exc
            raise
        rate = summary["steady_tokens_per_second"] or summary["tokens_per_second"]
        return contract.success_message(result.step, result.total_steps, result.tokens_total, rate,
                                        result.final_loss, str(saved.path))
    finally:
        recipe.close()


def lost_interrupt_message(recipe, outcome) -> tuple[str, dict]:
    """(message, state) for the termination log while the interrupt checkpoint is written: what stands if the
    kubelet's SIGKILL cuts the write (state `interrupt: lost`)."""
    manager = recipe.checkpoints
    latest = manager.latest()
    lost = outcome.step - (latest.step if latest else 0)
    message = clean_message(
        f"{EXIT_REASONS[ExitCode.INTERRUPTED]}: killed while writing the interrupt checkpoint at step "
        f"{outcome.step} (it did not finish within the grace period; raise spec.terminationGracePeriodSeconds); "
        f"lost; the run resumes from {'step ' + str(latest.step) if latest else 'the start'} ({lost} steps to "
        "train again)")
    state: dict = {"interrupt": "lost", "lostSteps": lost}
    checkpoint = manager.state()
    if checkpoint:
        state["checkpoint"] = checkpoint
    return message, state


def interrupted_message(recipe, result, facts: dict) -> str:
    """What an interrupted run says: the checkpoint written, or why the interrupt checkpoint was skipped."""
    manager = recipe.checkpoints
    latest = manager.latest()
    outcome = manager.interrupt
    if outcome is not None and not outcome.written:
        lost = result.step - (latest.step if latest else 0)
        facts.update(interrupt="skipped", lostSteps=lost)
        return (f"interrupted at step {result.step}/{result.total_steps}; {outcome.message}; the run resumes from "
                f"{'step ' + str(latest.step) if latest else 'the start'} ({lost} steps to train again); resumable")
    facts["interrupt"] = "written"
    where = latest.path if latest else "none"
    return f"interrupted at step {result.step}/{result.total_steps}; checkpoint {where}; resumable"


def termination_state(facts: dict) -> Optional[dict]:
    """The state for the termination message (api.contract.with_state): newest checkpoint, interrupt, output."""
    state: dict = {}
    recipe = facts.get("recipe")
    try:
        checkpoint = recipe.checkpoints.state() if recipe is not None and hasattr(recipe, "checkpoints") else None
    except OSError:
        checkpoint = None
    if checkpoint:
        state["checkpoint"] = checkpoint
    for key in ("interrupt", "lostSteps", "output"):
        if key in facts:
            state[key] = facts[key]
    return state or None


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubesloth.trainer",
                                     description="Full fine-tuning of one FineTuneJob (the trainer pod).")
    parser.add_argument("--config", help=f"FineTuneJob YAML (default: ${Env.CONFIG.value} or the pod mount)")
    args = parser.parse_args(argv)

    stop = threading.Event()
    deadline = Deadline.from_env()  # the grace period the kubelet gives between SIGTERM and SIGKILL

    def on_signal(signum, _frame):
        deadline.signalled()
        if not stop.is_set():
            log(f"{signal.Signals(signum).name}: finishing the current step, then checkpoint and exit")
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    started = time.time()
    facts: dict = {}
    try:
        message = run(args.config, stop, deadline, facts)
        code = ExitCode.OK
    except TrainerFailure as exc:
        code, message = exc.exit_code, exc.message
    except OSError as exc:
        from kubesloth.trainer.save import is_output_error
        if is_output_error(exc) and exc.filename:
            code = ExitCode.OUTPUT_UNWRITABLE
            message = OutputUnwritable(f"cannot write {exc.filename}: {exc.strerror}").message
        else:
            traceback.print_exc()
            code, message = ExitCode.ERROR, f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # anything unforeseen: the traceback goes to the log, one line to the operator
        traceback.print_exc()
        if is_out_of_memory(exc):
            code, message = ExitCode.OUT_OF_MEMORY, f"out of memory: {exc}"
        else:
            code, message = ExitCode.ERROR, f"{type(exc).__name__}: {exc}"
    finally:
        if facts.get("lock") is not None:
            facts["lock"].release()
    # The outcome is decided: a SIGTERM from now on must not change it. Python's finalization puts the default
    # action back for signals with a Python handler, so a SIGTERM while the interpreter shuts down (torch's
    # teardown takes a while) turned a finished run's exit 0 into 143 (a failed pod, retried); ignored signals
    # stay ignored.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)
    message = clean_message(message)
    reason = EXIT_REASONS.get(code, "Succeeded")
    write_termination_log(contract.with_state(message if code == ExitCode.OK else f"{reason}: {message}",
                                              termination_state(facts)))
    log(f"{'done' if code == ExitCode.OK else f'failed ({reason}, exit {int(code)})'} after "
        f"{time.time() - started:.1f}s: {message}")
    return int(code)
