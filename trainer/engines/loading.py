"""How the model is loaded: the one place every engine gets its (model, tokenizer) from.

- `load_unsloth`: Unsloth's FastLanguageModel in full fine-tuning mode, bf16, the profile's checkpointing mode
  (the unsloth engine and the fused engine on a GPU). Facts it follows (docs/unsloth-on-h200.md):
  full_finetuning=True with load_in_4bit/8bit False; Unsloth applies the checkpointing mode given to
  from_pretrained whatever a trainer config says, so the mode comes from the resolved profile.
- `load_transformers`: the plain transformers model with sdpa attention (the cpu engine and the fused engine on
  CPU: float32, since bf16 matmuls there are slow and lose precision the small tests compare at).

Both turn the KV cache off (packed rows stay apart only without it). This module imports nothing heavy at import:
the unsloth engine imports it before `import unsloth`, which must come before transformers/trl.
"""

from __future__ import annotations

import os
from typing import Any

# hp.gradient_checkpointing -> FastLanguageModel's use_gradient_checkpointing.
UNSLOTH_CHECKPOINTING = {"unsloth": "unsloth", "true": True, "false": False}


def before_unsloth(uses_trl: bool = True) -> None:
    """The environment `import unsloth` must see: a GPU without Unsloth's CPU fallback (if CUDA vanished, fail
    instead of silently training on CPU); for an engine that never uses TRL (`uses_trl=False`: the fused engine),
    no rewrite of TRL's trainers either.

    Unsloth 2026.10.9 regenerates and imports every TRL trainer (GRPO, DPO, SFT, ... ) at import, 12 s of a warm
    8B restart's 50 on the H200 (docs/benchmarks.md, run 6), unless UNSLOTH_ALLOW_CPU=1. On a host with a GPU
    that flag changes nothing else: it keeps the device type "cuda", and every other branch it guards (bf16,
    libcuda, triton) also asks torch.cuda.is_available(). A value the pod's environment sets is kept."""
    os.environ.setdefault("UNSLOTH_DISABLE_CPU_FALLBACK", "1")
    if not uses_trl:
        os.environ.setdefault("UNSLOTH_ALLOW_CPU", "1")


def load_unsloth(ctx: Any, uses_trl: bool = True) -> tuple[Any, Any]:
    """FastLanguageModel.from_pretrained for full fine-tuning; imports unsloth if the caller has not yet
    (`uses_trl`: see before_unsloth)."""
    before_unsloth(uses_trl)
    import unsloth  # noqa: F401  (before transformers: it patches it)
    from unsloth import FastLanguageModel

    import torch

    hp = ctx.hp
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(ctx.model_path),
        max_seq_length=hp.max_seq_length,
        dtype=torch.bfloat16,
        load_in_4bit=False,
        load_in_8bit=False,
        full_finetuning=True,
        use_gradient_checkpointing=UNSLOTH_CHECKPOINTING[hp.gradient_checkpointing],
    )
    model.config.use_cache = False
    return model, getattr(tokenizer, "tokenizer", tokenizer)  # a processor for multimodal checkpoints


def load_transformers(ctx: Any, dtype: Any = None, checkpointing: bool = False) -> tuple[Any, Any]:
    """AutoModelForCausalLM from the local model dir (float32 unless `dtype`), sdpa attention; `checkpointing`
    turns on non-reentrant activation checkpointing (an engine whose trainer does not do it from its config)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ctx.model_path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(ctx.model_path, dtype=dtype or torch.float32,
                                                 attn_implementation="sdpa", local_files_only=True)
    model.config.use_cache = False
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer
