"""The fused engine's optimizer core: per-parameter optimizers stepped inside backward (engines/fused.py wires it).

Each parameter gets its own optimizer, stepped from `Parameter.register_post_accumulate_grad_hook` as soon as
that parameter's gradient is complete; the gradient is then dropped. The full set of gradients (16 GB for an 8B
model in bf16) never exists, which is where the memory goes in an ordinary step.

- **Gradient clipping is per parameter.** The global norm is only known after the whole backward, when the fused
  steps have already consumed most gradients. With maxGradNorm > 0 each parameter tensor's gradient is clipped to
  that L2 norm on its own (so the global norm is at most maxGradNorm x sqrt(number of tensors)); 0 turns it off.
  The global pre-clip norm is still measured (sum of squares in the hooks) and logged.
- The learning-rate schedule is the same transformers scheduler as the other engines, stepped after each step.

Optimizer-state placement (the plan's `placement`; `fused_optimizer_for` builds each):
- `device`: states on the GPU (paged 8-bit states live in CUDA managed memory - only when they fit in free memory).
- `host`: 8-bit states kept in pinned host memory between steps and streamed to the GPU for each parameter's
  update (a prefetch of the next parameter overlaps the current update; copies back run on their own stream).
  No CUDA managed memory is used.
- `torch`: torch AdamW per parameter, 32-bit states on the device (on CPU: how CI tests the core).

Importing this module imports torch only: bitsandbytes and transformers are imported by the functions using them.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

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


def _split_bulk_states(saved: dict) -> tuple[dict, dict[int, dict[str, torch.Tensor]]]:
    """`saved` without its large state tensors, and those tensors by saved parameter id.

    bitsandbytes' load_state_dict deep-copies the whole state dict: for an 8B run that reads all 15 GB of mapped
    states into anonymous memory once more before they are copied to where the plan places them. The large
    tensors skip the library and go straight to their place (`_restore_bulk_states`, then `_place_states`)."""
    bulk: dict[int, dict[str, torch.Tensor]] = {}

    def keep(pid, entry: dict) -> dict:
        kept = {}
        for key, value in entry.items():
            if isinstance(value, dict):  # bnb's state_dict nests its 8-bit states (FSDP); its load un-nests them
                kept[key] = keep(pid, value)
            elif (isinstance(value, torch.Tensor) and key != "step" and key not in _SHARED_STATE_KEYS
                    and value.numel() >= HOST_STATE_MIN_NUMEL):
                bulk.setdefault(pid, {})[key] = value
            else:
                kept[key] = value
        return kept

    states = {pid: keep(pid, entry) for pid, entry in saved["state"].items()}
    return {**saved, "state": states}, bulk


def _restore_bulk_states(opt: torch.optim.Optimizer, saved: dict,
                         bulk: dict[int, dict[str, torch.Tensor]]) -> None:
    """Puts the tensors `_split_bulk_states` held back into `opt.state`, cast as torch and bitsandbytes cast them
    (a floating-point state takes its parameter's dtype, except what bitsandbytes never casts: its 8-bit states and
    their float32 absmax and quantisation maps, `non_castable_tensor_keys`). On the CPU they are copied, as
    the libraries would have (a state must not share memory with the dict it was loaded from); on a GPU
    `_place_states` copies each to its place."""
    saved_ids = [pid for group in saved["param_groups"] for pid in group["params"]]
    params = [p for group in opt.param_groups for p in group["params"]]
    uncast = getattr(opt, "non_castable_tensor_keys", ())
    for pid, param in zip(saved_ids, params):
        for key, value in bulk.get(pid, {}).items():
            cast = value.is_floating_point() and param.is_floating_point() and key not in uncast
            opt.state[param][key] = value.to(dtype=param.dtype if cast else value.dtype,
                                             copy=param.device.type == "cpu")


def _unfilled_state_buffer(opt: torch.optim.Optimizer, param: torch.nn.Parameter,
                           dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' get_state_buffer without its zero fill, for a state about to be overwritten: the fill runs on
    the GPU, so it migrates every page of the new managed buffer to the device only for the copy from the
    checkpoint to fault each back to the host (3.1 s of an 8B resume on the H200, bench run 10). Buffers bnb
    would not page (under 1e5 elements) come from bnb itself."""
    if not getattr(opt, "is_paged", False) or param.numel() < 1e5:
        return opt.get_state_buffer(param, dtype=dtype)
    import bitsandbytes.functional as F

    buffer = F.get_paged(*param.shape, dtype=dtype, device=param.device)
    opt.page_mng.paged_tensors.append(buffer)  # what get_state_buffer does: bnb's page manager knows it
    return buffer


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
            saved, bulk = _split_bulk_states(state["optimizers"][name])
            try:
                opt.load_state_dict(saved, move_to_device=False)  # bitsandbytes: placement is ours
            except TypeError:
                opt.load_state_dict(saved)
            _restore_bulk_states(opt, saved, bulk)
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
                    paged = _unfilled_state_buffer(opt, param, value.dtype)
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


def fused_optimizer_for(model: torch.nn.Module, hp, device: str, placement: str,
                        total_steps: int) -> FusedOptimizer:
    """The FusedOptimizer a plan runs: torch AdamW per parameter on CPU and for `torch` (fused kernels on the
    GPU); otherwise bitsandbytes' 8-bit AdamW (paged for `paged`) updated directly, with the states in pinned host
    memory for `host`. The schedule is the transformers one, warm-up from the planned total (base.warmup_steps)."""
    from transformers import get_scheduler

    from kubesloth.trainer.engines.base import warmup_steps

    host = None
    direct = None
    if device == "cpu":
        factory = torch_adamw_factory(hp.learning_rate, hp.weight_decay)
    elif placement == "torch":
        factory = torch_adamw_factory(hp.learning_rate, hp.weight_decay, fused=True)
    else:
        factory = bnb_adamw8bit_factory(hp.learning_rate, hp.weight_decay, paged=placement == "paged")
        direct = bnb_direct_update
        if placement == "host":
            host = HostStateStore(torch.device("cuda"))
    warmup = warmup_steps(total_steps, hp.warmup_ratio)

    def make_scheduler(lead):
        return get_scheduler(hp.lr_scheduler, lead, num_warmup_steps=warmup, num_training_steps=total_steps)

    return FusedOptimizer(model.named_parameters(), factory, make_scheduler,
                          learning_rate=hp.learning_rate, max_grad_norm=hp.max_grad_norm,
                          host_states=host, direct_update=direct)
