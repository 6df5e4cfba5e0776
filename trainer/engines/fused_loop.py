"""How a fused step runs (`train_steps`), and a run of them with the trainer's callbacks, checkpoints and SIGTERM
(`run`). A step is one forward/backward over the step's whole batch (no accumulation: base.py's step arithmetic
says why) with the optimizer core of fused_optim.py stepping each parameter inside backward.

The loop runs on CPU with torch AdamW per parameter: that is how CI tests it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from kubesloth.trainer.engines.fused_optim import FusedOptimizer


@dataclass
class StepResult:
    step: int
    loss: float
    grad_norm: float
    learning_rate: float
    tokens: int  # label tokens in the step's batch (not masked)
    seconds: float  # wall time of the step, synchronised
    extra: dict = field(default_factory=dict)


def compute_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The model's own loss over `labels` (Unsloth's fused cross-entropy on GPU; plain CE on CPU)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                labels=batch["labels"], use_cache=False,
                **({"position_ids": batch["position_ids"]} if "position_ids" in batch else {}))
    return out.loss


def train_steps(
    model: torch.nn.Module,
    fused: FusedOptimizer,
    batches: Iterator[dict],
    max_steps: int,
    on_step: Callable[[StepResult], None] = lambda result: None,
    loss_fn: Callable[[torch.nn.Module, dict], torch.Tensor] = compute_loss,
    device: Optional[torch.device] = None,
) -> list[StepResult]:
    """Run fused steps until `fused.step == max_steps`; `on_step` sees each result (callbacks, checkpoints)."""
    results = []
    sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else (lambda: None)
    model.train()
    while fused.step < max_steps:
        try:
            batch = next(batches)
        except StopIteration:
            break
        if device is not None:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        t0 = time.perf_counter()
        lr = fused.lr
        fused.begin_step()
        loss = loss_fn(model, batch)
        loss.backward()
        norm = fused.end_step()
        loss_value = float(loss.detach())  # syncs: the step's kernels are done
        sync()
        result = StepResult(step=fused.step, loss=loss_value,
                            grad_norm=float(norm) if norm is not None else math.nan,
                            learning_rate=lr, tokens=int((batch["labels"] != -100).sum()),
                            seconds=time.perf_counter() - t0)
        results.append(result)
        on_step(result)
    return results


# --- a run of steps (the engine's train) -------------------------------------------------------------------------

class _Stop(Exception):
    """Raised from the step callback after the interrupt checkpoint: leaves the loop between steps."""


def count_tokens(batch: dict) -> int:
    """Tokens a batch trains, padding left out (the figure summary.json and the progress line count)."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


def run(ctx, start, model: torch.nn.Module, fused: FusedOptimizer, batches: Iterator[dict], *, total_steps: int,
        steps_per_epoch: int, last_loss: float, save: Callable, device: Optional[torch.device]):
    """Train from fused.step to total_steps: a progress event every logging step, a checkpoint every
    checkpointEverySteps and after the step SIGTERM arrived in (then it stops, interrupted). `start` is the
    StartEvent (its tokens_seen: the resumed count); `save(step, tokens_total, loss)` writes a checkpoint and
    returns it. Returns the TrainResult; the hooks are removed (the save check runs without fused steps)."""
    from kubesloth.trainer.callbacks import StepEvent, Throughput
    from kubesloth.trainer.engines.base import TrainResult
    from kubesloth.trainer.memory import snapshot

    hp = ctx.hp
    start_step = start.start_step
    tokens_total = start.tokens_seen
    losses: list[tuple[int, float]] = []
    last_checkpoint = None
    interrupted = False
    started = time.monotonic()
    ctx.callbacks.on_train_start(start)
    throughput = Throughput(start_step, tokens_total)
    pending = {"tokens": 0}

    def counted():
        for batch in batches:
            pending["tokens"] = count_tokens(batch)
            yield batch

    def on_step(result: StepResult) -> None:
        nonlocal tokens_total, last_checkpoint, interrupted, last_loss
        tokens_total += pending["tokens"]
        last_loss = result.loss
        losses.append((result.step, result.loss))
        if result.step % hp.logging_steps == 0 or result.step == total_steps:
            rate, eta = throughput.update(result.step, tokens_total, total_steps)
            ctx.callbacks.on_step(StepEvent(
                step=result.step, total_steps=total_steps, epoch=result.step / steps_per_epoch,
                loss=result.loss, learning_rate=result.learning_rate, tokens_total=tokens_total,
                tokens_per_second=rate, eta_seconds=eta, grad_norm=result.grad_norm,
                memory=snapshot(ctx.monitor)))
        stop = ctx.stop.is_set() and result.step < total_steps
        if stop or result.step % ctx.checkpoint_every == 0:
            last_checkpoint = save(result.step, tokens_total, last_loss)
            throughput.restart_interval()  # the write is not training time
        if stop:
            interrupted = True
            raise _Stop()

    try:
        train_steps(model, fused, counted(), total_steps, on_step=on_step, device=device)
    except _Stop:
        pass
    if fused.host_states is not None:
        fused.host_states.synchronize()
    fused.remove_hooks()  # the save check and any later forward/backward run without fused steps
    return TrainResult(step=fused.step, start_step=start_step, total_steps=total_steps,
                       epoch=fused.step / steps_per_epoch, tokens_total=tokens_total,
                       tokens_trained=tokens_total - start.tokens_seen, final_loss=last_loss,
                       train_seconds=time.monotonic() - started, interrupted=interrupted,
                       last_checkpoint=last_checkpoint, losses=losses,
                       steady_tokens_per_second=throughput.steady_tokens_per_second())


# --- checkpoint files (the same names every fused checkpoint has had) -------------------------------------------
MODEL_FILE, OPTIMIZER_FILE, RNG_FILE = "model.safetensors", "optimizer.pt", "rng_state.pt"


def write_checkpoint_files(folder: Path, model: torch.nn.Module, fused: FusedOptimizer) -> None:
    """Weights, every parameter's optimizer state with the schedule and step, and the RNG states."""
    from safetensors.torch import save_model

    save_model(model, str(folder / MODEL_FILE))
    torch.save(fused.state_dict(), folder / OPTIMIZER_FILE)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, folder / RNG_FILE)


def has_checkpoint_files(folder: Path) -> bool:
    return (folder / OPTIMIZER_FILE).is_file() and (folder / MODEL_FILE).is_file()


def read_checkpoint_files(folder: Path, model: torch.nn.Module, fused: FusedOptimizer) -> None:
    """What write_checkpoint_files wrote, back into the model, the optimizer (states placed as its plan says) and
    the RNGs."""
    from safetensors.torch import load_model

    load_model(model, str(folder / MODEL_FILE), strict=True)
    # Mapped, not read: an 8B run's states are 15 GB, which would otherwise sit in the pod's anonymous memory
    # (beside everything the plan counted) until each is copied to where the plan places it.
    state = torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=False, mmap=True)
    fused.load_state_dict(state)
    rng = torch.load(folder / RNG_FILE, weights_only=False)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
