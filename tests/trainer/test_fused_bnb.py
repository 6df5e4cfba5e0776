"""The fused engine's resume with bitsandbytes' 8-bit AdamW states, on CPU (bnb's CPU kernels; paging is GPU-only).

Large states (an 8B run's are 15 GB, mapped from the checkpoint) must go straight to their place, not through
bnb's load_state_dict, which deep-copies everything it is given."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
import bitsandbytes.optim.optimizer as bnb_optimizer  # noqa: E402  (the dev extra installs it: never skipped)

from kubesloth.trainer.engines.fused import FusedOptimizer, torch_adamw_factory, train_steps  # noqa: E402
from kubesloth.trainer.engines.fused_optim import (  # noqa: E402
    HOST_STATE_MIN_NUMEL,
    bnb_adamw8bit_factory,
    bnb_direct_update,
)

LR = 1e-3


def small_llama(seed: int = 0):
    """Big enough that its MLP and embedding states are 'large' (>= HOST_STATE_MIN_NUMEL elements)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).float()


def batches(n: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 256, (2, 16), generator=gen)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def fused_for(model, optimizer: str):
    if optimizer == "bnb8bit":
        factory, direct = bnb_adamw8bit_factory(LR, weight_decay=0.1, paged=False), bnb_direct_update
    else:
        factory, direct = torch_adamw_factory(LR, weight_decay=0.1), None
    schedule = lambda opt: transformers.get_scheduler("linear", opt, num_warmup_steps=1, num_training_steps=6)  # noqa: E731
    return FusedOptimizer(model.named_parameters(), factory, schedule, learning_rate=LR, max_grad_norm=1.0,
                          direct_update=direct)


def tensors(value, path=""):
    """(path, tensor) of every tensor in a nested state (bnb nests its 8-bit states under one key)."""
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from tensors(item, f"{path}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from tensors(item, f"{path}.{i}")


def large_states(opt_state: dict) -> list[str]:
    return [path for path, value in tensors(opt_state["optimizers"]) if value.numel() >= HOST_STATE_MIN_NUMEL]


@pytest.mark.parametrize("optimizer", ["bnb8bit", "torch"])
def test_resume_with_large_states_matches_an_uninterrupted_run(optimizer):
    data = batches(6)
    whole = small_llama()
    train_steps(whole, fused_for(whole, optimizer), iter(data), max_steps=6)

    first = small_llama()
    fused = fused_for(first, optimizer)
    train_steps(first, fused, iter(data[:3]), max_steps=3)
    saved_model, saved_opt = copy.deepcopy(first.state_dict()), copy.deepcopy(fused.state_dict())
    assert len(large_states(saved_opt)) >= 4  # the path under test is taken
    if optimizer == "bnb8bit":
        assert any(k.endswith(".state1") for k in large_states(saved_opt))

    resumed = small_llama(seed=123)
    resumed.load_state_dict(saved_model)
    fused2 = fused_for(resumed, optimizer)
    fused2.load_state_dict(saved_opt)
    # Large states placed by us own their memory: training on must not write into the dict they came from.
    # (Small ones are the library's: torch shares them when dtype and device already match.)
    before = {path: v.clone() for path, v in tensors(saved_opt["optimizers"]) if v.numel() >= HOST_STATE_MIN_NUMEL}
    train_steps(resumed, fused2, iter(data[3:]), max_steps=6)
    assert all(torch.equal(v, before[path]) for path, v in tensors(saved_opt["optimizers"]) if path in before)
    for (name, a), b in zip(resumed.named_parameters(), whole.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), name


def test_large_8bit_states_skip_bitsandbytes_deep_copy(monkeypatch):
    model = small_llama()
    fused = fused_for(model, "bnb8bit")
    train_steps(model, fused, iter(batches(2)), max_steps=2)
    saved = fused.state_dict()
    assert large_states(saved)

    copied: list[int] = []
    real_deepcopy = bnb_optimizer.deepcopy

    def recording_deepcopy(value, *args, **kwargs):
        copied.extend(t.numel() for _, t in tensors(value))
        return real_deepcopy(value, *args, **kwargs)

    monkeypatch.setattr(bnb_optimizer, "deepcopy", recording_deepcopy)
    fresh = small_llama(seed=5)
    fused_for(fresh, "bnb8bit").load_state_dict(saved)
    assert copied, "bitsandbytes' load_state_dict was not called"
    assert max(copied) < HOST_STATE_MIN_NUMEL


def test_bf16_parameters_keep_bitsandbytes_float32_quantisation_states(monkeypatch):
    """bnb never casts its absmax / qmap to the parameter's dtype (non_castable_tensor_keys); neither may the
    direct path. The threshold is lowered so the absmax tensors of this small model take that path."""
    from kubesloth.trainer.engines import fused_optim

    monkeypatch.setattr(fused_optim, "HOST_STATE_MIN_NUMEL", 256)
    data = batches(4)
    whole = small_llama().to(torch.bfloat16)
    train_steps(whole, fused_for(whole, "bnb8bit"), iter(data), max_steps=4)

    first = small_llama().to(torch.bfloat16)
    fused = fused_for(first, "bnb8bit")
    train_steps(first, fused, iter(data[:2]), max_steps=2)
    saved_model, saved_opt = copy.deepcopy(first.state_dict()), copy.deepcopy(fused.state_dict())
    assert any(path.endswith("absmax1") and v.numel() >= 256 for path, v in tensors(saved_opt["optimizers"]))

    resumed = small_llama(seed=9).to(torch.bfloat16)
    resumed.load_state_dict(saved_model)
    fused2 = fused_for(resumed, "bnb8bit")
    fused2.load_state_dict(saved_opt)
    for opt in fused2.optimizers:
        for state in opt.state.values():
            for key in ("absmax1", "absmax2", "qmap1", "qmap2"):
                if key in state:
                    assert state[key].dtype == torch.float32, key
    train_steps(resumed, fused2, iter(data[2:]), max_steps=4)
    for (name, a), b in zip(resumed.named_parameters(), whole.parameters()):
        assert torch.equal(a, b), name
