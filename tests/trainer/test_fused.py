"""The fused engine's core on CPU: per-parameter optimizers stepped inside backward, on a tiny Llama."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from kubesloth.trainer.engines.fused import (  # noqa: E402
    FusedOptimizer,
    FusedStepError,
    merge_batch_semantics,
    torch_adamw_factory,
    train_steps,
)

LR = 1e-2


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).float()


def batches(n: int, seed: int = 1, batch: int = 4, seq: int = 16):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 96, (batch, seq), generator=gen)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def linear_schedule(total: int):
    return lambda opt: transformers.get_scheduler("linear", opt, num_warmup_steps=1, num_training_steps=total)


def fused_for(model, max_grad_norm=0.0, factory=None, total=6):
    return FusedOptimizer(model.named_parameters(), factory or torch_adamw_factory(LR, weight_decay=0.1),
                          linear_schedule(total), learning_rate=LR, max_grad_norm=max_grad_norm)


def reference_run(model, data, clip):
    """The ordinary loop: full backward, then one AdamW over all parameters (decay groups as the Trainer's)."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, foreach=False)
    sched = linear_schedule(len(data))(opt)
    losses = []
    for batch in data:
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        clip(model)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def params_close(a, b, atol=1e-6):
    return all(torch.allclose(pa, pb, atol=atol, rtol=0) for pa, pb in zip(a.parameters(), b.parameters()))


def test_unclipped_fused_step_equals_one_adamw_over_all_parameters():
    data = batches(2) * 3  # repeated batches: learnable, so the loss falls
    model, ref = tiny_llama(), tiny_llama()
    ref_losses = reference_run(ref, data, clip=lambda m: None)
    fused = fused_for(model, total=6)
    results = train_steps(model, fused, iter(data), max_steps=6)
    assert [r.step for r in results] == [1, 2, 3, 4, 5, 6]
    assert [r.loss for r in results] == pytest.approx(ref_losses, abs=1e-5)
    assert params_close(model, ref)
    # The loss must move (the comparison above is not between two untouched models).
    assert results[-1].loss < results[0].loss


def test_gradients_never_outlive_their_step_and_each_parameter_steps_once():
    model = tiny_llama()
    fused = fused_for(model)
    batch = batches(1)[0]
    fused.begin_step()
    model(**batch, use_cache=False).loss.backward()
    fused.end_step()
    assert all(p.grad is None for p in model.parameters())
    assert sorted(fused._fired) == list(range(len(fused.params)))
    assert all(opt.state[p]["step"].item() == 1 for opt, p in zip(fused.optimizers, fused.params))


def test_clipping_is_per_parameter():
    """maxGradNorm clips each parameter tensor's gradient alone (SGD makes the applied gradient visible)."""
    max_norm = 0.05
    sgd = lambda name, p: torch.optim.SGD([p], lr=LR)  # noqa: E731
    data = batches(2)
    model, per_param_ref, global_ref = tiny_llama(), tiny_llama(), tiny_llama()
    fused = FusedOptimizer(model.named_parameters(), sgd, lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1),
                           learning_rate=LR, max_grad_norm=max_norm)
    results = train_steps(model, fused, iter(data), max_steps=2)
    for ref, clip in ((per_param_ref, lambda p: torch.nn.utils.clip_grad_norm_([p], max_norm)),
                      (global_ref, None)):
        opt = torch.optim.SGD(ref.parameters(), lr=LR)
        for batch in data:
            ref(**batch, use_cache=False).loss.backward()
            if clip:
                for p in ref.parameters():
                    clip(p)
            else:
                torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
    assert params_close(model, per_param_ref)
    assert not params_close(model, global_ref)  # a different rule, and the test can tell them apart
    # The logged norm is the global norm before clipping (larger than the limit here).
    assert results[0].grad_norm > max_norm


def test_clipping_off_leaves_gradients_alone():
    data = batches(3)
    model, ref = tiny_llama(), tiny_llama()
    reference_run(ref, data, clip=lambda m: None)
    train_steps(model, fused_for(model, max_grad_norm=0.0, total=3), iter(data), max_steps=3)
    assert params_close(model, ref)


def test_resume_from_state_dict_matches_an_uninterrupted_run():
    data = batches(6)
    whole = tiny_llama()
    train_steps(whole, fused_for(whole, max_grad_norm=1.0), iter(data), max_steps=6)

    first = tiny_llama()
    fused = fused_for(first, max_grad_norm=1.0)
    train_steps(first, fused, iter(data[:3]), max_steps=3)
    saved_model = copy.deepcopy(first.state_dict())
    saved_opt = copy.deepcopy(fused.state_dict())
    assert saved_opt["step"] == 3

    resumed = tiny_llama(seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(saved_model)
    fused2 = fused_for(resumed, max_grad_norm=1.0)
    fused2.load_state_dict(saved_opt)
    assert fused2.step == 3 and fused2.lr == pytest.approx(fused.lr)
    train_steps(resumed, fused2, iter(data[3:]), max_steps=6)
    assert params_close(resumed, whole)


def test_resume_rejects_optimizer_states_of_another_model():
    model = tiny_llama()
    fused = fused_for(model)
    train_steps(model, fused, iter(batches(1)), max_steps=1)
    state = fused.state_dict()
    state["optimizers"]["lm_head.extra"] = state["optimizers"].pop("lm_head.weight")
    with pytest.raises(FusedStepError, match="do not match"):
        fused_for(tiny_llama()).load_state_dict(state)


def test_backward_outside_a_step_is_an_error():
    model = tiny_llama()
    fused_for(model)
    with pytest.raises(FusedStepError, match="outside"):
        model(**batches(1)[0], use_cache=False).loss.backward()


def test_tied_weights_get_one_optimizer_and_one_step():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    fused = fused_for(model)
    before = model.lm_head.weight.detach().clone()
    train_steps(model, fused, iter(batches(2)), max_steps=2)  # step 1 is the warm-up step at lr 0
    tied = [n for n in fused.names if n.endswith("embed_tokens.weight") or n == "lm_head.weight"]
    assert len(tied) == 1
    assert not torch.equal(before, model.lm_head.weight)


def test_accumulation_is_folded_into_one_batch():
    assert merge_batch_semantics(1, 4) == 4
    assert merge_batch_semantics(8, 1) == 8


# --- the engine through the real entry point (`python -m kubesloth.trainer`'s main), CPU ------------------------

import json  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import yaml  # noqa: E402

from kubesloth.api.contract import CHECKPOINTS_DIR, FINAL_MODEL_DIR, SUMMARY_FILE, Env  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "examples" / "data" / "alpaca-tiny.jsonl"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from kubesloth.trainer.tiny import make_tiny_model
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def write_job(path: Path, model: Path, out: Path, **training) -> Path:
    spec = {
        "model": {"source": f"file://{model}", "maxSeqLength": 64},
        "dataset": {"source": f"file://{DATA}", "format": "alpaca", "maxSamples": 64},
        "training": {"profile": "custom", "maxSteps": 6, "learningRate": 3e-3, "perDeviceBatchSize": 4,
                     "gradientAccumulationSteps": 2, "optimizer": "adamw_torch", "gradientCheckpointing": "false",
                     "lrScheduler": "constant", "warmupRatio": 0.0, "maxGradNorm": 1.0, **training},
        "output": {"destination": f"file://{out}", "checkpointEverySteps": 3, "checkpointsToKeep": 5},
    }
    path.write_text(yaml.safe_dump({"apiVersion": "kubesloth.io/v1alpha1", "kind": "FineTuneJob",
                                    "metadata": {"name": "fused-test", "namespace": "t"}, "spec": spec}))
    return path


def run_entry_point(config: Path, monkeypatch, capsys) -> tuple[int, str]:
    from kubesloth.trainer.main import main
    monkeypatch.setenv(Env.ENGINE.value, "fused")
    monkeypatch.setenv(Env.METRICS_PORT.value, "0")
    monkeypatch.setenv(Env.TERMINATION_LOG.value, str(config.parent / "termination-log"))
    code = main(["--config", str(config)])
    return code, capsys.readouterr().out


def test_entry_point_trains_checkpoints_resumes_and_saves(tiny_model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    config = write_job(tmp_path / "job.yaml", tiny_model_dir, out)
    code, log = run_entry_point(config, monkeypatch, capsys)
    assert code == 0, log
    assert "engine fused" in log and "8 sequences per step (no accumulation)" in log
    assert "per-parameter clipping" in log
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["engine"] == "fused" and summary["steps"] == 6
    assert summary["steady_tokens_per_second"] > 0
    assert summary["tokens"] > 0 and summary["model"]["tensors_checked"] > 0
    assert (out / FINAL_MODEL_DIR / "model.safetensors").is_file()
    losses = [float(line.split(" loss ")[1].split()[0]) for line in log.splitlines() if "] step " in line]
    assert len(losses) == 6 and losses[-1] < losses[0]
    steps = sorted(p.name for p in (out / CHECKPOINTS_DIR).iterdir() if p.name.startswith("step-"))
    assert steps == ["step-00000003", "step-00000006"]

    # Every weight was trained (full fine-tuning): compare the saved model with the initial one.
    from safetensors.torch import load_file
    before = load_file(str(tiny_model_dir / "model.safetensors"))
    after = load_file(str(out / FINAL_MODEL_DIR / "model.safetensors"))
    unchanged = [name for name in before if torch.equal(before[name].float(), after[name].float())]
    assert not unchanged

    # Resume: drop what steps 4-6 wrote; the rerun resumes at step 3 and must land on the same loss.
    shutil.rmtree(out / CHECKPOINTS_DIR / "step-00000006")
    shutil.rmtree(out / FINAL_MODEL_DIR)
    (out / SUMMARY_FILE).unlink()
    code, log2 = run_entry_point(config, monkeypatch, capsys)
    assert code == 0, log2
    assert "resumed model" in log2 and "at step 3" in log2
    resumed = json.loads((out / SUMMARY_FILE).read_text())
    assert resumed["resumed_from_step"] == 3 and resumed["steps"] == 6
    assert resumed["final_loss"] == pytest.approx(summary["final_loss"], abs=1e-5)
    assert resumed["tokens"] == summary["tokens"]
    again = load_file(str(out / FINAL_MODEL_DIR / "model.safetensors"))
    assert all(torch.allclose(after[n], again[n], atol=1e-6) for n in after)


def test_entry_point_refuses_a_checkpoint_of_another_engine(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """A complete checkpoint without the fused engine's files is refused with a clear message, not half-loaded."""
    out = tmp_path / "out"
    foreign = out / CHECKPOINTS_DIR / "step-00000003"
    foreign.mkdir(parents=True)
    (foreign / "COMPLETE").write_text("{}")
    config = write_job(tmp_path / "job.yaml", tiny_model_dir, out)
    from kubesloth.trainer.config import load_job
    from kubesloth.trainer.output import run_identity

    # This run's checkpoint (its run identity), only not the fused engine's files.
    (foreign / "kubesloth-checkpoint.json").write_text(json.dumps({"step": 3, "run": run_identity(load_job(config))}))
    code, log = run_entry_point(config, monkeypatch, capsys)
    assert code == 2, log
    assert "not written by the fused engine" in log


def test_cpu_and_fused_engines_load_the_model_through_one_loader(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Both CPU engines take their model from engines/loading.load_transformers: the same class, float32, sdpa,
    no KV cache (the fused engine asks for checkpointing itself; the cpu engine's Trainer does it from its args)."""
    from kubesloth.trainer.engines import loading
    from kubesloth.trainer.main import main

    real, loaded = loading.load_transformers, {}

    def spy(ctx, *args, **kwargs):
        model, tokenizer = real(ctx, *args, **kwargs)
        loaded[ctx.job.metadata["name"]] = (type(model), next(model.parameters()).dtype,
                                            model.config._attn_implementation, model.config.use_cache)
        return model, tokenizer

    monkeypatch.setattr(loading, "load_transformers", spy)
    monkeypatch.setenv(Env.METRICS_PORT.value, "0")
    monkeypatch.setenv(Env.TERMINATION_LOG.value, str(tmp_path / "termination-log"))
    for engine in ("cpu", "fused"):
        (tmp_path / engine).mkdir()
        config = write_job(tmp_path / engine / "job.yaml", tiny_model_dir, tmp_path / engine / "out", maxSteps=1)
        config.write_text(config.read_text().replace("name: fused-test", f"name: {engine}"))
        monkeypatch.setenv(Env.ENGINE.value, engine)
        assert main(["--config", str(config)]) == 0, capsys.readouterr().out
    assert set(loaded) == {"cpu", "fused"}
    assert loaded["cpu"] == loaded["fused"]
    assert loaded["cpu"][1:] == (torch.float32, "sdpa", False)


# The layout decisions (placement, layers kept, sequences per step) are the planner's: tests/planner/.


def test_auto_runs_lean_and_fast_on_the_fused_engine_only_on_a_gpu():
    from kubesloth.trainer.engines import choose_engine, runs_on_gpu

    gpu, cpu = (lambda: True), (lambda: False)
    assert choose_engine("auto", gpu, profile="auto") == "fused"
    assert choose_engine("auto", gpu, profile="lean") == "fused"
    assert choose_engine("auto", gpu, profile="fast") == "fused"
    assert choose_engine("auto", gpu, profile="custom") == "unsloth"
    assert choose_engine("auto", cpu, profile="lean") == "cpu"
    assert choose_engine("fused", cpu) == "fused"  # its loop runs on CPU too
    assert runs_on_gpu("fused", gpu) and not runs_on_gpu("fused", cpu) and runs_on_gpu("unsloth", cpu)
