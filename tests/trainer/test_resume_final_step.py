"""A run killed after its final checkpoint but before the model was saved (the save is the last thing it does)
resumes at the final step: it trains nothing more, saves the checkpoint's weights, and never logs "31/30".

HF's Trainer, resumed at global_step == max_steps mid-epoch (30 steps of 8 per epoch: 6 batches into epoch 4),
would take one more optimizer step before its stop check."""

from __future__ import annotations

import json
import shutil

from safetensors.torch import load_file

from kubesloth.api.contract import CHECKPOINTS_DIR, FINAL_MODEL_DIR, SUMMARY_FILE

from .conftest import STEP_LINE, run_trainer, write_job


def test_resume_at_the_final_step_trains_no_extra_step(tiny_model, tmp_path):
    output = tmp_path / "out"
    # 64 records, batch 8: 8 steps an epoch; maxSteps 30 is not an epoch boundary. Checkpoint at 10, 20, 30.
    config = write_job(tmp_path, tiny_model, {"training": {"maxSteps": 30}}, destination=output)
    first = run_trainer(config, tmp_path)
    assert first.returncode == 0, first.output[-3000:]
    final = output / CHECKPOINTS_DIR / "step-00000030"
    assert (final / "COMPLETE").is_file()
    trained = load_file(output / FINAL_MODEL_DIR / "model.safetensors")

    # As if killed while saving the model: the final checkpoint is complete, the model and summary are not there.
    shutil.rmtree(output / FINAL_MODEL_DIR)
    (output / SUMMARY_FILE).unlink()
    again = run_trainer(config, tmp_path)
    assert again.returncode == 0, again.output[-3000:]
    assert "resuming from" in again.output and "(step 30)" in again.output
    steps = [STEP_LINE.match(line) for line in again.output.splitlines()]
    assert [m[0] for m in steps if m] == [], "resumed at the final step, it trained again"
    assert "31/30" not in again.output
    assert "trained 30/30 steps" in again.output
    summary = json.loads((output / SUMMARY_FILE).read_text())
    assert summary["steps"] == 30 and summary["resumed_from_step"] == 30 and summary["tokens_this_run"] == 0
    # The saved model is the checkpoint's (the trained weights), not the base model's.
    saved = load_file(output / FINAL_MODEL_DIR / "model.safetensors")
    assert saved.keys() == trained.keys()
    assert all(saved[k].equal(trained[k]) for k in saved)
    assert not (output / CHECKPOINTS_DIR / "step-00000031").exists()
