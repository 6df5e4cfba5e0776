"""The CPU engine (CI, the local demo): plain `transformers.Trainer` on a float32 model.

Why not TRL's SFTTrainer: TRL 1.15 always adds a fused lm-head loss whose kernel needs Triton, so its stock
trainer cannot take a step on CPU; plain Trainer with our own tokenization and collator does the same job (full
fine-tuning, causal-LM loss) with fewer moving parts. Why not unsloth's CPU fallback: see docs/trainer.md
(its dependency set is GPU-sized and it patches transformers at import).
"""

from __future__ import annotations

from kubesloth.trainer.data import ensure_pad_token
from kubesloth.trainer.engines import hf
from kubesloth.trainer.engines.base import RunContext, TrainerEngine
from kubesloth.trainer.engines import loading


class CpuEngine(TrainerEngine):
    name = "cpu"

    def setup(self, ctx: RunContext) -> None:
        from transformers import Trainer, TrainingArguments

        hf.quiet_transformers()
        # float32, sdpa; activation checkpointing comes from TrainingArguments (hp.gradient_checkpointing).
        self.model, self.tokenizer = loading.load_transformers(ctx)
        pad_id = ensure_pad_token(self.tokenizer)
        data = ctx.training_data(self.tokenizer)
        self.probe_ids = data.rows[0][0][:32]
        args = TrainingArguments(**hf.training_arguments(ctx, len(data), use_cpu=True, bf16=False, fp16=False))
        hf.attach_trainer(self, ctx, Trainer, args, data, pad_id)
