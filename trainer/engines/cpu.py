"""The CPU engine (CI, the local demo): plain `transformers.Trainer` on a float32 model.

Why not TRL's SFTTrainer: TRL 1.15 always adds a fused lm-head loss whose kernel needs Triton, so its stock
trainer cannot take a step on CPU; plain Trainer with our own tokenization and collator does the same job (full
fine-tuning, causal-LM loss) with fewer moving parts. Why not unsloth's CPU fallback: see docs/trainer.md
(its dependency set is GPU-sized and it patches transformers at import).
"""

from __future__ import annotations

from typing import Any

from kubesloth.trainer.data import CausalLMCollator, ensure_pad_token
from kubesloth.trainer.engines import hf
from kubesloth.trainer.engines.base import RunContext, TrainResult


class CpuEngine:
    name = "cpu"

    def __init__(self):
        self.model: Any = None
        self.tokenizer: Any = None
        self.probe_ids: list[int] = []
        self._trainer = None
        self._bridge = None
        self._ctx = None

    def setup(self, ctx: RunContext) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

        self._ctx = ctx
        hf.quiet_transformers()
        self.tokenizer = AutoTokenizer.from_pretrained(ctx.model_path, local_files_only=True)
        pad_id = ensure_pad_token(self.tokenizer)
        # float32 on CPU: bf16 matmuls there are slow and lose precision the small tests compare at.
        self.model = AutoModelForCausalLM.from_pretrained(ctx.model_path, dtype=torch.float32,
                                                          attn_implementation="sdpa", local_files_only=True)
        self.model.config.use_cache = False  # packed rows stay apart only without the KV cache
        data = ctx.training_data(self.tokenizer)
        self.probe_ids = data.rows[0][0][:32]
        args = TrainingArguments(**hf.training_arguments(ctx, len(data), use_cpu=True, bf16=False, fp16=False))

        class CpuTrainer(hf.SafeResumeMixin, Trainer):
            kubesloth_log = staticmethod(ctx.log)

        self._bridge = hf.Bridge(ctx, self.name, rows=len(data), examples=data.examples)
        self._trainer = CpuTrainer(model=self.model, args=args, train_dataset=data.as_hf_dataset(),
                                   data_collator=CausalLMCollator(pad_id, ctx.hp.packing),
                                   processing_class=self.tokenizer, callbacks=[self._bridge])

    def train(self) -> TrainResult:
        return hf.run(self._trainer, self._bridge, self._ctx)
