"""The GPU engine: Unsloth's FastLanguageModel in full fine-tuning mode + TRL's SFTTrainer.

`import unsloth` must come before transformers/trl (it patches both at import), so this module imports them
only inside setup(), and the entry point imports this module only when this engine runs; a process that ran
another engine never loads unsloth. Data, callbacks, checkpoints and the save check are the shared ones.

Facts this follows (docs/unsloth-on-h200.md): full_finetuning=True with load_in_4bit/8bit False and bf16;
Unsloth's trainer applies the checkpointing mode given to from_pretrained whatever the trainer config says, so
that mode comes from the resolved profile and SFTConfig's own flag stays off.
"""

from __future__ import annotations

import os
from typing import Any

from kubesloth.trainer.data import CausalLMCollator, ensure_pad_token
from kubesloth.trainer.engines.base import RunContext, TrainResult

_CHECKPOINTING = {"unsloth": "unsloth", "true": True, "false": False}


class UnslothEngine:
    name = "unsloth"

    def __init__(self):
        self.model: Any = None
        self.tokenizer: Any = None
        self.probe_ids: list[int] = []
        self._trainer = None
        self._bridge = None
        self._ctx = None

    def setup(self, ctx: RunContext) -> None:
        # A GPU without Unsloth's CPU fallback: if CUDA vanished, fail instead of silently training on CPU.
        os.environ.setdefault("UNSLOTH_DISABLE_CPU_FALLBACK", "1")
        import unsloth  # noqa: F401  (first: patches transformers and trl)
        from unsloth import FastLanguageModel

        import torch
        from trl import SFTConfig, SFTTrainer

        from kubesloth.trainer.engines import hf  # imports transformers: after unsloth

        self._ctx = ctx
        hf.quiet_transformers()
        hp = ctx.hp
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=str(ctx.model_path),
            max_seq_length=hp.max_seq_length,
            dtype=torch.bfloat16,
            load_in_4bit=False,
            load_in_8bit=False,
            full_finetuning=True,
            use_gradient_checkpointing=_CHECKPOINTING[hp.gradient_checkpointing],
        )
        self.model = model
        self.tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor for multimodal checkpoints
        pad_id = ensure_pad_token(self.tokenizer)
        self.model.config.use_cache = False
        data = ctx.training_data(self.tokenizer)
        self.probe_ids = data.rows[0][0][:32]
        kwargs = hf.training_arguments(ctx, len(data), bf16=True, fp16=False)
        kwargs["gradient_checkpointing"] = False  # Unsloth applies the mode given to from_pretrained
        args = SFTConfig(**kwargs, max_length=hp.max_seq_length, packing=False,
                         dataset_kwargs={"skip_prepare_dataset": True})

        class UnslothTrainer(hf.SafeResumeMixin, SFTTrainer):
            kubesloth_log = staticmethod(ctx.log)

        self._bridge = hf.Bridge(ctx, self.name, rows=len(data), examples=data.examples)
        self._trainer = UnslothTrainer(model=self.model, args=args, train_dataset=data.as_hf_dataset(),
                                       data_collator=CausalLMCollator(pad_id, hp.packing),
                                       processing_class=self.tokenizer, callbacks=[self._bridge])
        self._hf = hf

    def train(self) -> TrainResult:
        return self._hf.run(self._trainer, self._bridge, self._ctx)
