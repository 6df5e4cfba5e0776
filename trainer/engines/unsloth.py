"""The GPU engine: Unsloth's FastLanguageModel in full fine-tuning mode + TRL's SFTTrainer.

`import unsloth` must come before transformers/trl (it patches both at import), so this module imports them
only inside setup(), and the entry point imports this module only when this engine runs; a process that ran
another engine never loads unsloth. Data, callbacks, checkpoints and the save check are the shared ones.

The model comes from `loading.load_unsloth` (full fine-tuning, bf16, the profile's checkpointing mode; the facts
it follows are in its docstring). Unsloth's trainer applies the checkpointing mode given to from_pretrained
whatever the trainer config says, so SFTConfig's own flag stays off.
"""

from __future__ import annotations

from kubesloth.trainer.data import ensure_pad_token
from kubesloth.trainer.engines import loading
from kubesloth.trainer.engines.base import RunContext, TrainerEngine


class UnslothEngine(TrainerEngine):
    name = "unsloth"

    def setup(self, ctx: RunContext) -> None:
        loading.before_unsloth()
        import unsloth  # noqa: F401  (first: patches transformers and trl)
        from trl import SFTConfig, SFTTrainer

        from kubesloth.trainer.engines import hf  # imports transformers: after unsloth

        hf.quiet_transformers()
        hp = ctx.hp
        self.model, self.tokenizer = loading.load_unsloth(ctx)
        pad_id = ensure_pad_token(self.tokenizer)
        data = ctx.training_data(self.tokenizer)
        self.probe_ids = data.rows[0][0][:32]
        kwargs = hf.training_arguments(ctx, len(data), bf16=True, fp16=False)
        kwargs["gradient_checkpointing"] = False  # Unsloth applies the mode given to from_pretrained
        args = SFTConfig(**kwargs, max_length=hp.max_seq_length, packing=False,
                         dataset_kwargs={"skip_prepare_dataset": True})
        hf.attach_trainer(self, ctx, SFTTrainer, args, data, pad_id)
