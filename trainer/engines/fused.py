"""The fused engine: the optimizer step runs inside backward, one parameter at a time.

Each parameter gets its own optimizer, stepped from `Parameter.register_post_accumulate_grad_hook` as soon as
that parameter's gradient is complete; the gradient is then dropped. The full set of gradients (16 GB for an 8B
model in bf16) never exists, which is where the memory goes in an ordinary step.

Semantics that differ from the `unsloth`/`cpu` engines (stated in docs/benchmarks.md too):
- **No gradient accumulation.** A step is one forward/backward over perDeviceBatchSize x gradientAccumulationSteps
  sequences at once, with the loss averaged over all label tokens of the step - the same objective as accumulation
  with a token-mean loss, paid for with the activation memory of the larger micro-batch.
- **Gradient clipping is per parameter.** The global norm is only known after the whole backward, when the fused
  steps have already consumed most gradients. With maxGradNorm > 0 each parameter tensor's gradient is clipped to
  that L2 norm on its own (so the global norm is at most maxGradNorm x sqrt(number of tensors)); 0 turns it off.
  The global pre-clip norm is still measured (sum of squares in the hooks) and logged.
- The learning-rate schedule is the same transformers scheduler as the other engines, stepped after each step.

Optimizer-state placement (`StatePlacement`):
- `device`: states on the GPU (paged 8-bit states live in CUDA managed memory - only when they fit in free memory).
- `host`: 8-bit states kept in pinned host memory between steps and streamed to the GPU for each parameter's
  update (a prefetch of the next parameter overlaps the current update; copies back run on their own stream).
  No CUDA managed memory is used.

The core (`FusedOptimizer`, `train_steps`) runs on CPU with torch AdamW per parameter: that is how CI tests it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch

# States smaller than this stay on the GPU in host mode: copying them costs more in launches than they weigh.
HOST_STATE_MIN_NUMEL = 1 << 16
# Optimizer-state entries shared between parameters or tiny (quantisation maps): never moved to the host.
_SHARED_STATE_KEYS = frozenset({"qmap1", "qmap2"})

class FusedStepError(RuntimeError):
    """The fused step cannot be applied as stated (a parameter stepped twice, a hook outside a step...)."""


def no_decay(name: str, param: torch.Tensor) -> bool:
    """The parameters the transformers Trainer exempts from weight decay: biases and norm weights (1-D)."""
    return param.ndim < 2 or name.endswith(".bias")


class HostStateStore:
    """Keeps each optimizer's large state tensors in pinned host memory between its parameter's steps.

    Before a parameter's update its states are copied to the GPU (ideally prefetched while the previous parameter
    was being updated); after the update they are copied back on a second stream and the GPU copies are freed
    once that copy is done (record_stream). Host and device directions use separate streams so they overlap.
    """

    def __init__(self, device: torch.device, min_numel: int = HOST_STATE_MIN_NUMEL):
        self.device = device
        self.min_numel = min_numel
        self.h2d = torch.cuda.Stream(device)
        self.d2h = torch.cuda.Stream(device)
        self._ready: dict[int, dict[str, torch.Tensor]] = {}  # id(opt) -> device copies fetched ahead
        self._written: dict[int, torch.cuda.Event] = {}  # id(opt) -> its last copy back to the host
        self.host_bytes = 0

    def _host_keys(self, state: dict) -> list[str]:
        return [k for k, v in state.items() if isinstance(v, torch.Tensor) and k not in _SHARED_STATE_KEYS
                and not str(k).startswith("_host_") and v.numel() >= self.min_numel]

    def prefetch(self, opt: torch.optim.Optimizer) -> None:
        """Start copying opt's host states to the GPU on the h2d stream (no wait)."""
        if id(opt) in self._ready:
            return
        compute = torch.cuda.current_stream(self.device)
        pairs = []
        for state in opt.state.values():
            for key in self._host_keys(state):
                host = state[key]
                if host.device.type == "cpu":
                    # From the compute stream's pool: blocks of a side stream's pool are not reused by the
                    # compute stream, and reserved memory would grow by a few GiB.
                    pairs.append((key, host, torch.empty(host.shape, dtype=host.dtype, device=self.device)))
        if pairs:
            self.h2d.wait_stream(compute)  # a reused block may still be read by queued compute work
            written = self._written.get(id(opt))
            if written is not None:  # the host buffers must hold the last update before they are read
                self.h2d.wait_event(written)
            with torch.cuda.stream(self.h2d):
                for _key, host, dev in pairs:
                    dev.copy_(host, non_blocking=True)
            for _key, _host, dev in pairs:
                dev.record_stream(self.h2d)
        self._ready[id(opt)] = {key: dev for key, _host, dev in pairs}

    def fetch(self, opt: torch.optim.Optimizer) -> None:
        """Make opt's states device tensors for its update (using a prefetch if one was started)."""
        self.prefetch(opt)
        copies = self._ready.pop(id(opt))
        compute = torch.cuda.current_stream(self.device)
        compute.wait_stream(self.h2d)
        for state in opt.state.values():
            for key, dev in copies.items():
                if key in state and state[key].device.type == "cpu":
                    state[key] = dev

    def release(self, opt: torch.optim.Optimizer) -> None:
        """Copy opt's large states back to pinned host memory after its update; the GPU copies are then freed."""
        compute = torch.cuda.current_stream(self.device)
        self.d2h.wait_stream(compute)
        for state in opt.state.values():
            for key in self._host_keys(state):
                dev = state[key]
                if dev.device.type != "cuda":
                    continue
                host = state.get(f"_host_{key}")
                if host is None:
                    host = torch.empty(dev.shape, dtype=dev.dtype, pin_memory=True)
                    self.host_bytes += host.numel() * host.element_size()
                with torch.cuda.stream(self.d2h):
                    host.copy_(dev, non_blocking=True)
                dev.record_stream(self.d2h)
                state[key] = host
                state[f"_host_{key}"] = host
        event = torch.cuda.Event()
        event.record(self.d2h)
        self._written[id(opt)] = event

    def synchronize(self) -> None:
        self.d2h.synchronize()
        self.h2d.synchronize()


def _strip_host_aliases(state_dict: dict) -> dict:
    """An optimizer state_dict without the pinned-buffer aliases HostStateStore keeps beside each state."""
    return {
        "state": {k: {n: v for n, v in s.items() if not str(n).startswith("_host_")}
                  for k, s in state_dict["state"].items()},
        "param_groups": state_dict["param_groups"],
    }


class FusedOptimizer:
    """Per-parameter optimizers stepped inside backward, with a shared LR schedule and per-parameter clipping.

    Use: `begin_step()`, `loss.backward()`, `end_step()`. Between them every trainable parameter whose gradient
    is computed is updated exactly once, and its `.grad` is None again afterwards.
    """

    def __init__(
        self,
        named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
        make_optimizer: Callable[[str, torch.nn.Parameter], torch.optim.Optimizer],
        make_scheduler: Callable[[torch.optim.Optimizer], object],
        learning_rate: float,
        max_grad_norm: float = 0.0,
        host_states: Optional[HostStateStore] = None,
        direct_update: Optional[Callable[[torch.optim.Optimizer, torch.nn.Parameter], None]] = None,
    ):
        if max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0, got {max_grad_norm}")
        self.names: list[str] = []
        self.params: list[torch.nn.Parameter] = []
        seen: set[int] = set()
        for name, param in named_parameters:
            if param.requires_grad and id(param) not in seen:  # tied weights: one optimizer, one hook
                seen.add(id(param))
                self.names.append(name)
                self.params.append(param)
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.index = {id(p): i for i, p in enumerate(self.params)}
        self.optimizers = [make_optimizer(n, p) for n, p in zip(self.names, self.params)]
        # The schedule runs on a stand-in optimizer; each parameter's optimizer takes its lr before stepping.
        self._lead_param = torch.zeros(1, requires_grad=True)
        self.lead = torch.optim.SGD([self._lead_param], lr=learning_rate)
        self.scheduler = make_scheduler(self.lead)
        self.max_grad_norm = float(max_grad_norm)
        self.host_states = host_states
        self.direct_update = direct_update
        self.step = 0  # optimizer steps completed
        self._in_step = False
        self._fired: list[int] = []
        self._order: list[int] = []  # hook order seen in the first step: the prefetch order afterwards
        self._sq_norm: Optional[torch.Tensor] = None
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.params]

    @property
    def lr(self) -> float:
        return float(self.lead.param_groups[0]["lr"])

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def begin_step(self) -> None:
        if self._in_step:
            raise FusedStepError("begin_step() called twice without end_step()")
        self._in_step = True
        self._fired = []
        self._sq_norm = None
        lr = self.lr
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr

    def _hook(self, param: torch.nn.Parameter) -> None:
        # A post-accumulate-grad hook must return None; it may consume and drop param.grad.
        i = self.index[id(param)]
        if not self._in_step:
            raise FusedStepError(f"gradient of {self.names[i]} arrived outside begin_step()/end_step()")
        if i in self._fired:
            # Happens when one weight is used in two autograd graphs (e.g. inside and outside a reentrant
            # checkpoint): its first partial gradient would already have been applied.
            raise FusedStepError(f"{self.names[i]} received two gradient accumulations in one step; the fused "
                                 "step needs each weight's gradient to be complete in one accumulation")
        self._fired.append(i)
        grad = param.grad
        norm = torch.linalg.vector_norm(grad, dtype=torch.float32)
        self._sq_norm = norm * norm if self._sq_norm is None else self._sq_norm + norm * norm
        if self.max_grad_norm > 0:
            # Same formula as torch.nn.utils.clip_grad_norm_ applied to this tensor alone.
            scale = torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0)
            grad.mul_(scale.to(grad.dtype))
        opt = self.optimizers[i]
        if self.host_states is not None:
            self.host_states.fetch(opt)
            nxt = self._next_in_order(i)
            if nxt is not None:
                self.host_states.prefetch(self.optimizers[nxt])
        if self.direct_update is not None:
            self.direct_update(opt, param)
        else:
            opt.step()
        if self.host_states is not None:
            self.host_states.release(opt)
        param.grad = None

    def _next_in_order(self, i: int) -> Optional[int]:
        if not self._order:
            return None
        pos = len(self._fired) - 1
        if pos + 1 < len(self._order) and self._order[pos] == i:
            return self._order[pos + 1]
        return None

    def end_step(self) -> Optional[torch.Tensor]:
        """Finish the step; returns the global gradient norm before clipping (a 0-d tensor, not synced)."""
        if not self._in_step:
            raise FusedStepError("end_step() without begin_step()")
        self._in_step = False
        if not self._fired:
            raise FusedStepError("no parameter received a gradient in this step (was backward() called?)")
        if not self._order:
            self._order = list(self._fired)
        self.step += 1
        self.lead.step()  # a no-op (no gradient); keeps the scheduler's step-order check quiet
        self.scheduler.step()
        return None if self._sq_norm is None else self._sq_norm.sqrt()

    # --- checkpoints -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        if self.host_states is not None:
            self.host_states.synchronize()
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # direct (unsynchronised) updates, paged states read from the host
        return {
            "step": self.step,
            "scheduler": self.scheduler.state_dict(),
            "lead": self.lead.state_dict(),
            "optimizers": {name: _strip_host_aliases(opt.state_dict())
                           for name, opt in zip(self.names, self.optimizers)},
        }

    def load_state_dict(self, state: dict) -> None:
        missing = [n for n in self.names if n not in state["optimizers"]]
        extra = [n for n in state["optimizers"] if n not in self.index_by_name]
        if missing or extra:
            raise FusedStepError(f"checkpoint optimizer states do not match the model's parameters "
                                 f"(missing {missing[:3]}, unexpected {extra[:3]})")
        for name, opt, param in zip(self.names, self.optimizers, self.params):
            saved = state["optimizers"][name]
            try:
                opt.load_state_dict(saved, move_to_device=False)  # bitsandbytes: placement is ours
            except TypeError:
                opt.load_state_dict(saved)
            self._place_states(opt, param)
        self.lead.load_state_dict(state["lead"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])

    @property
    def index_by_name(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}

    def _place_states(self, opt: torch.optim.Optimizer, param: torch.nn.Parameter) -> None:
        for state in opt.state.values():
            for key, value in list(state.items()):
                if not isinstance(value, torch.Tensor) or param.device.type == "cpu":
                    continue
                if key == "step" and value.device.type == "cpu" and value.numel() == 1:
                    continue  # torch keeps AdamW's step counter on the host unless capturable
                on_host = (self.host_states is not None and key not in _SHARED_STATE_KEYS
                           and value.numel() >= self.host_states.min_numel)
                if getattr(opt, "is_paged", False) and key in ("state1", "state2"):
                    # Back into CUDA managed memory (bitsandbytes' own buffer), not into torch's pool.
                    paged = opt.get_state_buffer(param, dtype=value.dtype)
                    paged.copy_(value.reshape(paged.shape))
                    state[key] = paged
                elif on_host:
                    pinned = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
                    pinned.copy_(value)
                    state[key] = pinned
                    state[f"_host_{key}"] = pinned
                else:
                    state[key] = value.to(param.device)
        if hasattr(opt, "initialized"):
            opt.initialized = True  # bitsandbytes would otherwise move every state to the GPU at its next step


def bnb_direct_update(opt: torch.optim.Optimizer, param: torch.nn.Parameter) -> None:
    """bitsandbytes' Optimizer8bit.step for one parameter without its torch.cuda.synchronize() per parameter.

    The update kernels are stream-ordered, so the synchronize only stalls the CPU and drains the queue (a gap on
    the GPU after every parameter); with host states it would also serialise the side-stream copies with compute.
    Measured on the 8B shape: 7893 tokens/s with bitsandbytes' own step (paged), 8578 without (host states).
    """
    if not opt.initialized:
        opt.check_overrides()
        opt.initialized = True
    group = opt.param_groups[0]
    state = opt.state[param]
    if len(state) == 0:
        opt.init_state(group, param, 0, 0)
    opt.prefetch_state(param)  # paged states: an async prefetch on the stream, ordered before the update
    opt.update_step(group, param, 0, 0)


# --- the engine (the trainer's entry point runs this) -----------------------------------------------------------

PLACEMENTS = ("paged", "device", "host", "torch")
# The benchmark's knobs (bench/gpu_bench.py sweeps them): override the plan's placement / layers kept. Not part
# of the pod contract; a run with them logs that its plan was overridden.
TUNING_ENV = "KUBESLOTH_FUSED_TUNING"


@dataclass
class FusedPlan:
    """What this engine runs, taken from the memory planner's plan (kubesloth.planner; logged at start)."""

    device: str  # cuda | cpu
    placement: str  # paged | device | host | torch
    sequences_per_step: int
    checkpointing: str  # unsloth | true | false
    uncheckpointed_layers: int = 0
    budget_bytes: Optional[int] = None  # torch's cap (set_per_process_memory_fraction), if any
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        cap = f", torch memory cap {self.budget_bytes / 2**30:.1f} GiB" if self.budget_bytes else ""
        layers = (f", {self.uncheckpointed_layers} decoder layers without checkpointing"
                  if self.uncheckpointed_layers else "")
        return (f"fused step on {self.device}: optimizer states {self.placement}, {self.sequences_per_step} "
                f"sequences per step (no accumulation), checkpointing {self.checkpointing}{layers}{cap}")


def _tuning() -> dict:
    import json
    import os

    raw = os.environ.get(TUNING_ENV)
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        from kubesloth.trainer.errors import BadConfig
        raise BadConfig(f"{TUNING_ENV} must be a JSON object, got {raw[:80]!r}") from None
    return value if isinstance(value, dict) else {}


# The placement each optimizer asks for when the run has no plan (CPU tests, a model the planner cannot shape).
OPTIMIZER_PLACEMENTS = {"paged_adamw_8bit": "paged", "adamw_8bit": "device", "adamw_torch": "torch",
                        "adamw_torch_fused": "torch"}


class FusedEngine:
    """Engine `fused`: a manual loop with the optimizer step fused into backward (see the module docstring).

    On a GPU the model is Unsloth's FastLanguageModel (full fine-tuning, bf16) with its offloaded checkpointing
    and its fused cross-entropy (the loss through `labels=`); on CPU it is the float32 transformers model with
    torch AdamW per parameter (CI). Data, callbacks, checkpoint layout, metrics and the save are the shared ones.
    """

    name = "fused"

    def __init__(self):
        self.model = None
        self.tokenizer = None
        self.probe_ids: list[int] = []
        self.plan: Optional[FusedPlan] = None
        self.fused: Optional[FusedOptimizer] = None

    # --- setup ------------------------------------------------------------------------------------------------
    def setup(self, ctx) -> None:
        from kubesloth.trainer.data import CausalLMCollator, ensure_pad_token

        self.ctx = ctx
        hp = ctx.hp
        on_gpu = torch.cuda.is_available()
        tuning = _tuning()
        if on_gpu:
            budget = self._memory_cap(ctx)
            self._load_unsloth(ctx)
        else:
            budget = None
            self._load_cpu(ctx)
        pad_id = ensure_pad_token(self.tokenizer)
        self.data = ctx.training_data(self.tokenizer)
        self.probe_ids = self.data.rows[0][0][:32]
        self.collate = CausalLMCollator(pad_id, hp.packing)
        self.batch = merge_batch_semantics(hp.per_device_batch_size, hp.gradient_accumulation_steps)
        self.steps_per_epoch = max(math.ceil(len(self.data) / self.batch), 1)
        self.total_steps = hp.max_steps or hp.epochs * self.steps_per_epoch
        self.plan = self._plan(ctx, on_gpu, budget, tuning)
        ctx.log(self.plan.describe())
        for note in self.plan.notes:
            ctx.log(note)
        if on_gpu and self.plan.uncheckpointed_layers:
            self._skip_checkpointing(self.plan.uncheckpointed_layers)
        self.fused = self._make_fused(ctx)
        self.start_tokens = 0
        self.last_loss = math.nan
        if ctx.resume_from is not None:
            self._resume(ctx.resume_from)

    def _memory_cap(self, ctx) -> Optional[int]:
        """torch's cap from the plan: the budget less the safety margin, the paged states (NVML counts them,
        torch does not) and what the process holds outside torch, so the device peak stays inside the budget."""
        import os

        # What Unsloth sets at import (less fragmentation); here CUDA starts before that import.
        os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
        plan = ctx.plan
        cap = plan.torch_cap_bytes if plan is not None else None
        if not cap:
            return None
        torch.cuda.init()
        total = torch.cuda.get_device_properties(0).total_memory
        cap = min(cap, total)
        torch.cuda.set_per_process_memory_fraction(max(cap, 1 << 30) / total)
        ctx.log(f"GPU budget {plan.request.budget_bytes / 2**30:.2f} GiB ({plan.request.budget_source}): torch "
                f"capped at {cap / 2**30:.2f} GiB")
        return cap

    def _load_unsloth(self, ctx) -> None:
        import os

        os.environ.setdefault("UNSLOTH_DISABLE_CPU_FALLBACK", "1")
        import unsloth  # noqa: F401  (before transformers: it patches it)
        from unsloth import FastLanguageModel

        hp = ctx.hp
        mode = {"unsloth": "unsloth", "true": True, "false": False}[hp.gradient_checkpointing]
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=str(ctx.model_path), max_seq_length=hp.max_seq_length, dtype=torch.bfloat16,
            load_in_4bit=False, load_in_8bit=False, full_finetuning=True, use_gradient_checkpointing=mode)
        model.config.use_cache = False
        model.train()
        self.model = model
        self.tokenizer = getattr(tokenizer, "tokenizer", tokenizer)

    def _load_cpu(self, ctx) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(ctx.model_path, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(ctx.model_path, dtype=torch.float32,
                                                          attn_implementation="sdpa", local_files_only=True)
        self.model.config.use_cache = False
        if ctx.hp.gradient_checkpointing != "false":
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.train()

    def _decoder_layers(self) -> list:
        from transformers.modeling_layers import GradientCheckpointingLayer

        return [m for m in self.model.modules() if isinstance(m, GradientCheckpointingLayer)]

    def _skip_checkpointing(self, count: int) -> None:
        """Selective checkpointing: the last `count` decoder layers keep their activations (no recompute)."""
        layers = [m for m in self._decoder_layers() if getattr(m, "gradient_checkpointing", False)]
        for layer in layers[len(layers) - count:]:
            layer.gradient_checkpointing = False

    def _plan(self, ctx, on_gpu: bool, budget: Optional[int], tuning: dict) -> FusedPlan:
        """The planner's layout, as this engine runs it (the plan was made once, in trainer.profiles)."""
        from kubesloth.trainer.errors import BadConfig

        hp = ctx.hp
        layout = ctx.plan.layout if ctx.plan is not None else None
        placement = layout.placement if layout is not None else OPTIMIZER_PLACEMENTS.get(hp.optimizer)
        plan = FusedPlan(device="cuda" if on_gpu else "cpu", placement="torch", sequences_per_step=self.batch,
                         checkpointing=hp.gradient_checkpointing, budget_bytes=budget)
        if layout is None or layout.engine != "fused":
            # Forced onto this engine (KUBESLOTH_ENGINE=fused) without a fused plan: say what runs differently.
            if hp.gradient_accumulation_steps > 1:
                plan.notes.append(f"fused engine: gradientAccumulationSteps {hp.gradient_accumulation_steps} x "
                                  f"perDeviceBatchSize {hp.per_device_batch_size} run as one batch of {self.batch} "
                                  "sequences per step (same token-mean loss, no accumulation)")
            if hp.max_grad_norm > 0:
                plan.notes.append(f"fused engine: maxGradNorm {hp.max_grad_norm:g} clips each parameter's "
                                  "gradient on its own (per-parameter clipping)")
        if not on_gpu:
            return plan  # torch AdamW per parameter
        if placement is None:
            raise BadConfig(f"spec.training.optimizer: {hp.optimizer} is not supported by the fused engine "
                            f"(allowed: {', '.join(OPTIMIZER_PLACEMENTS)})")
        plan.placement = tuning.get("placement") or placement
        plan.uncheckpointed_layers = int(tuning.get("uncheckpointed_layers",
                                                    layout.uncheckpointed_layers if layout is not None else 0))
        if tuning:
            plan.notes.append(f"{TUNING_ENV} overrides the plan: {tuning}")
        return plan

    def _make_fused(self, ctx) -> FusedOptimizer:
        from transformers import get_scheduler

        from kubesloth.trainer.engines.base import warmup_steps

        hp = ctx.hp
        placement = self.plan.placement
        host = None
        direct = None
        if self.plan.device == "cpu":
            factory = torch_adamw_factory(hp.learning_rate, hp.weight_decay)
        elif placement == "torch":
            factory = torch_adamw_factory(hp.learning_rate, hp.weight_decay, fused=True)
        else:
            factory = bnb_adamw8bit_factory(hp.learning_rate, hp.weight_decay, paged=placement == "paged")
            direct = bnb_direct_update
            if placement == "host":
                host = HostStateStore(torch.device("cuda"))
        warmup = warmup_steps(self.total_steps, hp.warmup_ratio)

        def make_scheduler(lead):
            return get_scheduler(hp.lr_scheduler, lead, num_warmup_steps=warmup,
                                 num_training_steps=self.total_steps)

        return FusedOptimizer(self.model.named_parameters(), factory, make_scheduler,
                              learning_rate=hp.learning_rate, max_grad_norm=hp.max_grad_norm,
                              host_states=host, direct_update=direct)

    # --- data ---------------------------------------------------------------------------------------------------
    def _order(self, epoch: int) -> list[int]:
        """The rows of an epoch in a seeded order; a function of (seed, epoch) only, so resume needs no state."""
        generator = torch.Generator().manual_seed(self.ctx.hp.seed + epoch)
        return torch.randperm(len(self.data), generator=generator).tolist()

    def batches_from(self, step: int) -> Iterator[dict]:
        """The batches of steps step+1, step+2, ... (the last batch of an epoch may be short)."""
        while True:
            epoch, index = divmod(step, self.steps_per_epoch)
            order = self._order(epoch)
            rows = order[index * self.batch:(index + 1) * self.batch]
            yield self.collate([self.data[i] for i in rows])
            step += 1

    # --- checkpoints --------------------------------------------------------------------------------------------
    def _save_checkpoint(self, step: int, tokens_total: int):
        from safetensors.torch import save_model

        meta = {"engine": self.name, "profile": self.ctx.hp.profile, "epoch": step / self.steps_per_epoch,
                "tokens_seen": tokens_total, "loss": self.last_loss, "hyperparameters": self.ctx.hp.as_dict(),
                "fused_plan": {"placement": self.plan.placement, "sequences_per_step": self.batch}}
        with self.ctx.checkpoints.writing(step, meta) as folder:
            save_model(self.model, str(folder / "model.safetensors"))
            torch.save(self.fused.state_dict(), folder / "optimizer.pt")
            rng = {"cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state_all()
            torch.save(rng, folder / "rng_state.pt")
        checkpoint = self.ctx.checkpoints.latest()
        self.ctx.callbacks.on_checkpoint(step, str(checkpoint.path))
        return checkpoint

    def _resume(self, checkpoint) -> None:
        from safetensors.torch import load_model

        from kubesloth.trainer.errors import BadConfig

        folder = checkpoint.path
        if not (folder / "optimizer.pt").is_file() or not (folder / "model.safetensors").is_file():
            raise BadConfig(f"checkpoint {folder} was not written by the fused engine (no optimizer.pt/"
                            "model.safetensors); resume it with the engine that wrote it")
        load_model(self.model, str(folder / "model.safetensors"), strict=True)
        state = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=False)
        self.fused.load_state_dict(state)
        rng = torch.load(folder / "rng_state.pt", weights_only=False)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        meta = checkpoint.metadata()
        self.start_tokens = int(meta.get("tokens_seen", 0))
        self.last_loss = float(meta.get("loss", math.nan))
        self.ctx.log(f"fused: resumed model, {len(self.fused.optimizers)} optimizer states, schedule and RNG at "
                     f"step {self.fused.step}")

    # --- train --------------------------------------------------------------------------------------------------
    def train(self):
        from kubesloth.trainer.callbacks import StartEvent, StepEvent, Throughput
        from kubesloth.trainer.engines.base import TrainResult
        from kubesloth.trainer.memory import snapshot

        ctx, hp = self.ctx, self.ctx.hp
        start_step = self.fused.step
        tokens_total = self.start_tokens
        losses: list[tuple[int, float]] = []
        last_checkpoint = None
        interrupted = False
        started = time.monotonic()
        if start_step >= self.total_steps:
            return TrainResult(step=start_step, start_step=start_step, total_steps=self.total_steps,
                               epoch=start_step / self.steps_per_epoch, tokens_total=tokens_total,
                               tokens_trained=0, final_loss=self.last_loss, train_seconds=0.0,
                               interrupted=False, last_checkpoint=ctx.resume_from)
        ctx.callbacks.on_train_start(StartEvent(engine=self.name, profile=hp.profile, total_steps=self.total_steps,
                                                start_step=start_step, tokens_seen=tokens_total,
                                                examples=self.data.examples, rows=len(self.data)))
        throughput = Throughput(start_step, tokens_total)
        device = torch.device("cuda") if self.plan.device == "cuda" else None
        pending = {"tokens": 0}

        def count_tokens(batch: dict) -> int:
            mask = batch.get("attention_mask")
            return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())

        batches = self.batches_from(start_step)

        def counted():
            for batch in batches:
                pending["tokens"] = count_tokens(batch)
                yield batch

        def on_step(result: StepResult) -> None:
            nonlocal tokens_total, last_checkpoint, interrupted
            tokens_total += pending["tokens"]
            self.last_loss = result.loss
            losses.append((result.step, result.loss))
            if result.step % hp.logging_steps == 0 or result.step == self.total_steps:
                rate, eta = throughput.update(result.step, tokens_total, self.total_steps)
                ctx.callbacks.on_step(StepEvent(
                    step=result.step, total_steps=self.total_steps, epoch=result.step / self.steps_per_epoch,
                    loss=result.loss, learning_rate=result.learning_rate, tokens_total=tokens_total,
                    tokens_per_second=rate, eta_seconds=eta, grad_norm=result.grad_norm,
                    memory=snapshot(ctx.monitor)))
            stop = ctx.stop.is_set() and result.step < self.total_steps
            if stop or result.step % ctx.checkpoint_every == 0:
                last_checkpoint = self._save_checkpoint(result.step, tokens_total)
                throughput.restart_interval()  # the write is not training time
            if stop:
                interrupted = True
                raise _Stop()

        try:
            train_steps(self.model, self.fused, counted(), self.total_steps, on_step=on_step, device=device)
        except _Stop:
            pass
        if self.fused.host_states is not None:
            self.fused.host_states.synchronize()
        self.fused.remove_hooks()  # the save check and any later forward/backward run without fused steps
        return TrainResult(step=self.fused.step, start_step=start_step, total_steps=self.total_steps,
                           epoch=self.fused.step / self.steps_per_epoch, tokens_total=tokens_total,
                           tokens_trained=tokens_total - self.start_tokens, final_loss=self.last_loss,
                           train_seconds=time.monotonic() - started, interrupted=interrupted,
                           last_checkpoint=last_checkpoint, losses=losses,
                           steady_tokens_per_second=throughput.steady_tokens_per_second())


class _Stop(Exception):
    """Raised from the step callback after the interrupt checkpoint: leaves the loop between steps."""


# --- the loop ---------------------------------------------------------------------------------------------------

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


def merge_batch_semantics(per_device_batch_size: int, gradient_accumulation_steps: int) -> int:
    """The fused engine's sequences per step: accumulation is folded into one batch (see the module doc)."""
    return per_device_batch_size * gradient_accumulation_steps


def torch_adamw_factory(learning_rate: float, weight_decay: float, betas=(0.9, 0.999), eps=1e-8,
                        fused: Optional[bool] = None) -> Callable[[str, torch.nn.Parameter], torch.optim.Optimizer]:
    """torch AdamW for one parameter (the CPU path and fp32 states on GPU); no decay for biases and norms."""
    def make(name: str, param: torch.nn.Parameter) -> torch.optim.Optimizer:
        wd = 0.0 if no_decay(name, param) else weight_decay
        kwargs = {"fused": fused} if fused is not None else {"foreach": False}
        return torch.optim.AdamW([param], lr=learning_rate, betas=betas, eps=eps, weight_decay=wd, **kwargs)
    return make


def bnb_adamw8bit_factory(learning_rate: float, weight_decay: float, paged: bool, betas=(0.9, 0.999),
                          eps=1e-8) -> Callable[[str, torch.nn.Parameter], torch.optim.Optimizer]:
    """bitsandbytes' (Paged)AdamW8bit for one parameter, as the transformers Trainer configures it."""
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if paged else bnb.optim.AdamW8bit

    def make(name: str, param: torch.nn.Parameter) -> torch.optim.Optimizer:
        wd = 0.0 if no_decay(name, param) else weight_decay
        return cls([param], lr=learning_rate, betas=betas, eps=eps, weight_decay=wd)
    return make
