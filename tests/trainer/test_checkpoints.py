"""Checkpoint directories (marker last, partial ignored, retention), optimizer state that survives a changed
param-group layout, and the failure messages (out of memory, output, one-line/token-free)."""

from __future__ import annotations

import pytest
import torch

from kubesloth.api.contract import COMPLETE_MARKER
from kubesloth.trainer.checkpoints import METADATA_FILE, CheckpointManager
from kubesloth.trainer.errors import OutputUnwritable


def test_complete_checkpoints_only_and_retention(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    assert manager.latest() is None
    for step in (10, 20, 30):
        with manager.writing(step, {"engine": "test"}) as staging:
            (staging / "weights").write_text(str(step))
            assert not manager.path_for(step).exists(), "nothing at the final name before the commit"
    assert [c.step for c in manager.complete()] == [20, 30], "checkpointsToKeep=2"
    latest = manager.latest()
    assert latest.step == 30 and (latest.path / COMPLETE_MARKER).is_file()
    meta = latest.metadata()
    assert {k: meta[k] for k in ("step", "engine", "bytes")} == {"step": 30, "engine": "test", "bytes": 2}
    assert meta["write_seconds"] >= 0, "the write time is recorded for the interrupt checkpoint's estimate"
    assert not manager.staging_root.exists()

    # A newer dir without the marker (killed between rename and marker) and a staging leftover.
    partial = manager.path_for(40)
    partial.mkdir()
    (partial / METADATA_FILE).write_text("{}")
    manager.new_staging_dir(50)
    assert manager.latest().step == 30, "a partial checkpoint is never picked"
    removed = manager.remove_partial()
    assert set(removed) == {partial, manager.staging_root} and not partial.exists()


def test_failed_write_leaves_nothing(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    with pytest.raises(RuntimeError):
        with manager.writing(10, {}) as staging:
            (staging / "half").write_text("x")
            raise RuntimeError("disk trouble")
    assert manager.complete() == [] and not manager.path_for(10).exists()


def two_group_optimizer(model, groups):
    params = dict(model.named_parameters())
    return torch.optim.AdamW([{"params": [params[n] for n in names], "weight_decay": wd}
                              for names, wd in groups], lr=1e-2)


def test_regrouped_optimizer_state_loads_by_parameter_name():
    from kubesloth.trainer.engines.hf import adapt_optimizer_state, optimizer_signature

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 2))
    old = two_group_optimizer(model, [(["0.weight", "2.weight"], 0.1), (["0.bias", "1.weight", "1.bias", "2.bias"], 0.0)])
    model(torch.randn(5, 4)).sum().backward()
    old.step()
    saved, saved_sig = old.state_dict(), optimizer_signature(model, old)

    # The same parameters split differently (e.g. another decay rule or an engine that groups by layer).
    new = two_group_optimizer(model, [(["0.weight", "0.bias", "1.weight"], 0.1),
                                      (["1.bias", "2.weight", "2.bias"], 0.0)])
    with pytest.raises(ValueError, match="doesn't match the size of optimizer's group"):
        torch.optim.AdamW(new.param_groups).load_state_dict(saved)  # what a plain resume does
    current_sig = optimizer_signature(model, new)
    state, note = adapt_optimizer_state(saved, saved_sig, current_sig, new.state_dict()["param_groups"])
    assert "remapped by parameter name" in note
    new.load_state_dict(state)
    for name, param in model.named_parameters():
        assert torch.equal(new.state[param]["exp_avg"], old.state[param]["exp_avg"]), name
    assert [g["weight_decay"] for g in new.param_groups] == [0.1, 0.0], "the current groups' settings stay"

    same, note = adapt_optimizer_state(saved, saved_sig, saved_sig, saved["param_groups"])
    assert same is saved and note is None
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    state, note = adapt_optimizer_state(saved, saved_sig, optimizer_signature(model, sgd), [])
    assert state is None and "optimizer changed from AdamW to SGD" in note


def test_out_of_memory_advice_is_the_planners_and_each_change_fits():
    from dataclasses import replace

    from kubesloth.api.v1alpha1 import FineTuneJobSpec
    from kubesloth.planner import GIB, KNOWN_SHAPES
    from kubesloth.planner.fit import plan as make_plan
    from kubesloth.trainer.main import is_out_of_memory
    from kubesloth.trainer.profiles import resolve_run
    from kubesloth.trainer.recipe import out_of_memory_advice

    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't "
                                         "allocate memory: you tried to allocate 123 bytes"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    spec = FineTuneJobSpec.model_validate({
        "model": {"source": "file:///m", "maxSeqLength": 16384}, "dataset": {"source": "file:///d.jsonl"},
        "output": {"destination": "file:///o"}, "resources": {"gpuMemoryGiB": 24},
        "training": {}})
    run = resolve_run(spec, KNOWN_SHAPES["llama-3.1-8b"], "fused", on_gpu=True)
    assert run.plan.fits
    advice = out_of_memory_advice(run.plan)
    # Nothing of this model fits 85 % of 24 GiB: a bigger budget is the one honest change.
    assert advice == "the planner suggests: a GPU budget of 28 GiB"
    roomy = resolve_run(spec.model_copy(update={"resources": spec.resources.model_copy(
        update={"gpu_memory_gi_b": 48})}), KNOWN_SHAPES["llama-3.1-8b"], "fused", on_gpu=True)
    assert "the plan for 85 % of the budget" in out_of_memory_advice(roomy.plan)
    assert "gpuMemoryGiB: 41" in out_of_memory_advice(roomy.plan)
    # Every suggestion is a change the planner honours: planning with it fits 85 % of the budget.
    tighter = replace(run.plan.request, budget_bytes=int(24 * GIB * 0.85))
    suggested = make_plan(tighter).suggestions
    assert suggested
    for suggestion in suggested:
        if suggestion.field == "spec.model.maxSeqLength":
            batch = {"per_device_batch_size": 1} if "perDeviceBatchSize: 1" in suggestion.message else {}
            assert make_plan(replace(tighter, seq_len=suggestion.value, **batch)).fits
        elif suggestion.field == "spec.training.perDeviceBatchSize":
            assert make_plan(replace(tighter, per_device_batch_size=suggestion.value,
                                     gradient_accumulation_steps=1)).fits
        elif suggestion.field == "spec.resources.gpuMemoryGiB":
            assert make_plan(replace(tighter, budget_bytes=suggestion.value * GIB)).fits
    assert "training.profile: lean" not in advice  # the old advice the product ignored


def test_messages_are_one_line_short_and_token_free(monkeypatch):
    from kubesloth.trainer.main import clean_message

    monkeypatch.setenv("HF_TOKEN", "hf_abcdefgh")
    message = clean_message("failed with hf_abcdefgh\nsecond line " + "x" * 5000)
    assert "hf_abcdefgh" not in message and "\n" not in message and len(message.encode()) <= 1000


def test_destination_without_room_for_the_model(tmp_path):
    from kubesloth.trainer.save import check_writable

    check_writable(tmp_path / "out")
    with pytest.raises(OutputUnwritable, match="GiB free; the model alone needs"):
        check_writable(tmp_path / "out", need_bytes=1 << 60)
