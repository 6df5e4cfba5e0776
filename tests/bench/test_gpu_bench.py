"""bench/gpu_bench.py without a GPU: shapes, tokenizer and data (through the trainer's own pipeline), the parsers of
the trainer's lines, the plan-table summary, and a CPU dry run of `models` + `plan-table` through the real entry
point (tiny shapes: seconds)."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kubesloth.local.cluster import REPO_ROOT

BENCH = REPO_ROOT / "bench" / "gpu_bench.py"
_spec = importlib.util.spec_from_file_location("gpu_bench", BENCH)
gb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gb)

# planner.Plan.summary() as the trainer logs it (keys may grow: `new_key`).
PLAN_LINE = ('[trainer] plan {"profile": "lean", "engine": "fused", "placement": "host", "optimizer": '
             '"paged_adamw_8bit", "checkpointing": "unsloth", "sequences_per_step": 2, "seq_len": 1000, '
             '"uncheckpointed_layers": 0, "budget_bytes": 25769803776, "budget_source": "resources.gpuMemoryGiB", '
             '"torch_cap_bytes": 23514218496, "fits": true, "predicted": {"torch_reserved_bytes": 23000000000, '
             '"device_bytes": 24000000000, "host_bytes": 1, "checkpoint_bytes": 2, "tokens_per_second": 7000.5}, '
             '"notes": ["a", "b"], "new_key": {"x": [1, 2]}}\n')


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench-models")
    assert gb.main(["models", "--shapes", "tiny,tiny-qwen", "--seqs", "64,2048,8192,16384", "--out", str(out)]) == 0
    return out


# --- shapes ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, params, positions, tied, model_type", [
    ("8b", 8_030_261_248, 131072, False, "llama"),        # Llama-3.1-8B
    ("qwen7b", 7_615_616_512, 32768, False, "qwen2"),     # Qwen2.5-7B
    ("qwen1.5b", 1_543_714_304, 32768, True, "qwen2"),    # Qwen2.5-1.5B
    ("1b", 1_235_814_400, 131072, True, "llama"),         # Llama-3.2-1B
])
def test_shapes_have_the_real_models_sizes(shape, params, positions, tied, model_type):
    import torch
    from transformers import AutoModelForCausalLM

    config = gb.model_config(shape)
    assert (config.model_type, config.max_position_embeddings, config.tie_word_embeddings) == (
        model_type, positions, tied)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == params
    assert abs(gb.estimated_params(shape) - params) / params < 1e-3


def test_builds_go_smallest_first():
    assert sorted(["8b", "qwen7b", "qwen1.5b"], key=gb.estimated_params) == ["qwen1.5b", "qwen7b", "8b"]


def test_models_builds_only_what_the_rows_name():
    assert gb.shapes_and_seqs("8b:16384:24,qwen7b:8192:48,8b:2048:24:lean") == (["8b", "qwen7b"], [16384, 8192, 2048])


# --- tokenizer and data -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", ["tiny", "tiny-qwen"])
def test_one_token_per_byte_under_the_class_transformers_picks(models, shape):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models / shape, local_files_only=True)
    text = "hello world  abc z"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 2)
    assert len(tokenizer) == 259
    assert json.loads((models / shape / "config.json").read_text())["vocab_size"] >= len(tokenizer)


@pytest.mark.parametrize("shape", ["tiny", "tiny-qwen"])
@pytest.mark.parametrize("seq", [64, 2048, 8192, 16384])
def test_every_row_is_exactly_seq_tokens_through_the_trainer_pipeline(models, shape, seq):
    from transformers import AutoTokenizer

    from kubesloth.trainer.data import build_training_data

    tokenizer = AutoTokenizer.from_pretrained(models / shape, local_files_only=True)
    data = build_training_data([gb.data_path(models, seq)], fmt="text", text_field="text", max_samples=None,
                               tokenizer=tokenizer, max_seq_length=seq, packing=False)
    assert len(data) == gb.ROWS_IN_DATA
    assert [len(data[i]["input_ids"]) for i in range(len(data))] == [seq] * gb.ROWS_IN_DATA
    assert data.tokens == seq * gb.ROWS_IN_DATA


def test_data_is_seeded_letters_and_spaces(models, tmp_path):
    rows = [json.loads(line)["text"] for line in gb.data_path(models, 64).read_text().splitlines()]
    assert len(rows) == gb.ROWS_IN_DATA and len(set(rows)) == gb.ROWS_IN_DATA
    assert all(len(r) > 64 and set(r) <= set(gb.LETTERS + " ") for r in rows)
    again = gb.build_data(tmp_path / "again.jsonl", 64)
    assert again.read_text() == gb.data_path(models, 64).read_text()
    assert (models / "data.jsonl").is_file()  # the table's and issue7's (seq 2048)


# --- the trainer's lines ------------------------------------------------------------------------------------------

def _progress_line(memory: dict) -> str:
    from kubesloth.trainer.callbacks import ProgressLog, StepEvent

    stream = io.StringIO()
    ProgressLog(stream).on_step(StepEvent(step=3, total_steps=8, epoch=0.5, loss=11.9876, learning_rate=1e-5,
                                          tokens_total=3 * 16384, tokens_per_second=8000.0, eta_seconds=12.0,
                                          memory=memory))
    return stream.getvalue()


def test_trainer_step_lines_as_progress_log_prints_them():
    gpu = _progress_line({"gpu_reserved": 18 * 2**30, "gpu_peak": int(18.62 * 2**30), "device_used": 35 * 2**30})
    step, total, loss, peak = gb.trainer_step(gpu)
    assert (step, total, loss) == (3, 8, 11.9876)
    assert abs(peak - 18.62 * 2**30) < 0.01 * 2**30
    assert gb.trainer_step(_progress_line({"host_rss": 2**30}))[:4] == (3, 8, 11.9876, None)  # CPU line
    assert gb.trainer_step(_progress_line({"gpu_reserved": 2**30}))[3] is None  # peak printed as "-"
    assert gb.trainer_step("[trainer] checkpoint step 3 -> /x") is None


def test_parse_plan_sample_line():
    plan = gb.parse_plan(PLAN_LINE)
    assert plan["placement"] == "host" and plan["sequences_per_step"] == 2
    assert plan["predicted"]["tokens_per_second"] == 7000.5
    assert plan["new_key"] == {"x": [1, 2]}  # keys may grow
    assert gb.parse_plan("  12.345 " + PLAN_LINE.rstrip() + "  trailing words") == plan  # a bench log line
    assert gb.parse_plan("[trainer] plan {not json") is None
    assert gb.parse_plan("[trainer] plan [1, 2]") is None
    assert gb.parse_plan("[trainer] fused step on cuda: optimizer states host, 8 sequences per step") is None


def test_plan_rows():
    rows = gb.parse_plan_rows("8b:16384:24, qwen7b:8192:48:lean,qwen1.5b:2048:-,8b:2048:12.5")
    assert [(r["shape"], r["seq"], r["budget_gib"], r["profile"]) for r in rows] == [
        ("8b", 16384, 24, "auto"), ("qwen7b", 8192, 48, "lean"), ("qwen1.5b", 2048, None, "auto"),
        ("8b", 2048, 12.5, "auto")]
    assert [r["env"] for r in rows] == [{}] * 4
    env_rows = gb.parse_plan_rows("8b:2048:48:lean@UNSLOTH_ALLOW_CPU=1+KUBESLOTH_X=a=b,8b:2048:48@")
    assert [(r["profile"], r["env"]) for r in env_rows] == [
        ("lean", {"UNSLOTH_ALLOW_CPU": "1", "KUBESLOTH_X": "a=b"}), ("auto", {})]
    assert env_rows[0]["row"] == "8b:2048:48:lean@UNSLOTH_ALLOW_CPU=1+KUBESLOTH_X=a=b"  # the table names it whole
    for bad in ("8b:16384", "70b:2048:24", "qwen7b:65536:24", "8b:2048:0", "8b:2048:x", "8b:2048:24:turbo", "",
                "8b:2048:24@X", "8b:2048:24@lower=1"):
        with pytest.raises(SystemExit):
            gb.parse_plan_rows(bad)


def test_step_tokens_follow_the_short_last_batch():
    assert [gb.step_tokens(k, 3, 100) for k in range(1, 7)] == [300, 300, 200, 300, 300, 200]
    assert [gb.step_tokens(k, 8, 100) for k in (1, 2)] == [800, 800]
    assert gb.step_tokens(1, 16, 100) == 800


def _fake_trainer(tmp_path: Path, with_plan: bool) -> Path:
    """A child that prints what the trainer prints (plan line, fused description, GPU step lines) and then waits
    to be killed, like a trainer about to save."""
    lines = ["[trainer] engine fused; profile lean: batch 8 x accumulation 1, optimizer paged_adamw_8bit, "
             "checkpointing unsloth, lr 1e-05 (constant, warm-up 0), maxSeqLength 1000, packing False",
             "[trainer] fused step on cuda: optimizer states host, 2 sequences per step (no accumulation), "
             "checkpointing unsloth, 3 decoder layers without checkpointing, torch memory cap 21.90 GiB"]
    if with_plan:
        lines.append(PLAN_LINE.rstrip())
    script = tmp_path / "fake_trainer.py"
    script.write_text(
        "import sys, time\n"
        f"for line in {lines!r}:\n    print(line, flush=True)\n"
        "for step in range(1, 9):\n"
        "    time.sleep(0.05)\n"
        "    print(f'[trainer] step {step}/8 loss {12 - step / 10:.4f} lr 1.000e-05 tok/s 1 epoch 1.00 eta 0s '\n"
        "          f'mem gpu reserved 20.00GiB peak {20 + step / 100:.2f}GiB device 23.00GiB', flush=True)\n"
        "time.sleep(30)\n")
    return script


@pytest.mark.parametrize("with_plan", [True, False])
def test_run_child_and_summary_with_a_fake_trainer(tmp_path, with_plan):
    script = _fake_trainer(tmp_path, with_plan)
    nvml = gb.NvmlPeak()
    watch = gb.PlanWatch()
    raw = gb.run_child("fake", [sys.executable, str(script)], dict(os.environ), tmp_path, tmp_path / "fake.log",
                       nvml, last_step=8, timeout=20, on_line=watch)
    nvml.stop()
    assert raw["killed_after_last"] and not raw["timed_out"] and raw["wall"] < 15
    row = gb.parse_plan_rows("tiny:1000:24")[0]
    r = gb.summarise_plan_row(row, raw, watch, params=10**9, warmup=3)
    assert (r["placement"], r["sequences_per_step"], r["uncheckpointed_layers"]) == ("host", 2, 3 if not with_plan
                                                                                      else 0)
    assert r["engine"] == "fused" and r["resolved_profile"] == "lean"
    assert r["torch_reserved_peak"] == int(20.08 * 2**30)
    assert r["losses"][1] == 11.9 and r["timed_steps"] == 5
    steps = raw["steps"]
    expected = 2 * 1000 * 5 / (steps[8][0] - steps[3][0])
    assert math.isclose(r["tokens_per_s"], expected)
    if with_plan:
        assert r["plan"]["new_key"] == {"x": [1, 2]}
        assert (r["torch_cap_bytes"], r["budget_bytes"], r["fits"]) == (23514218496, 25769803776, True)
        assert r["predicted"] == {"torch_reserved_bytes": 23000000000, "device_bytes": 24000000000,
                                  "tokens_per_second": 7000.5}
        assert math.isclose(r["err_tokens_per_s"], (7000.5 - expected) / expected)
        assert math.isclose(r["err_torch_reserved"], (23e9 - r["torch_reserved_peak"]) / r["torch_reserved_peak"])
        assert r["err_device"] is None  # no NVML on this machine
    else:
        assert r["plan"] is None and r["predicted"] is None and r["err_tokens_per_s"] is None
        assert r["torch_cap_bytes"] == int(21.90 * 2**30) and r["budget_bytes"] is None
        assert r["sequences_per_step_from"] == "fused plan description"
    md = gb.plan_markdown([r, {**row, "skipped": "10s of the budget left"}])
    assert md.count("\n") == 4 and "tiny:1000:24" in md and "skipped" in md


# --- the CPU dry run, end to end ----------------------------------------------------------------------------------

def test_cpu_dry_run_models_and_plan_table(tmp_path):
    env = dict(os.environ, KUBESLOTH_ENGINE="fused", KUBESLOTH_METRICS_PORT="0")
    run = lambda *args: subprocess.run([sys.executable, str(BENCH), *args], env=env, capture_output=True,  # noqa
                                       text=True, timeout=300)
    models, out = tmp_path / "m", tmp_path / "out"
    built = run("models", "--rows", "tiny:64:24,tiny-qwen:64:24", "--out", str(models))
    assert built.returncode == 0, built.stdout + built.stderr
    assert {p.name for p in models.iterdir()} >= {"tiny", "tiny-qwen", "data-64.jsonl", "data.jsonl"}
    done = run("plan-table", "--models", str(models), "--rows", "tiny:64:24,tiny-qwen:64:24,tiny:64:-:lean",
               "--out", str(out), "--work", str(tmp_path / "work"), "--cache", str(tmp_path / "cache"),
               "--budget", "240", "--row-timeout", "120", "--warmup", "2", "--timed", "3")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "plan-table.json").read_text())
    assert report["meta"]["steps"] == 5
    rows = report["rows"]
    assert [r["row"] for r in rows] == ["tiny:64:24", "tiny-qwen:64:24", "tiny:64:-:lean"]
    for r in rows:
        assert r["killed_after_last"] and r["exit_code"] == -9 and not r["timed_out"], r["tail"]
        assert sorted(map(int, r["losses"])) == [1, 2, 3, 4, 5] and r["timed_steps"] == 3
        assert r["tokens_per_s"] > 0 and r["sequences_per_step"] and r["first_step_s"] > 0
        assert r["engine"] == "fused" and r["params"] > 0
        assert r["predicted"] is None or set(r["predicted"]) == {"torch_reserved_bytes", "device_bytes",
                                                                 "tokens_per_second"}
    assert [r["cache"] for r in rows] == ["cold", "cold", "warm"]
    job = json.loads((tmp_path / "work" / "job-plan-00-tiny_64_24.yaml").read_text())
    spec = job["spec"]
    assert spec["model"]["maxSeqLength"] == 64 and spec["resources"] == {"gpuMemoryGiB": 24}
    assert spec["training"]["maxSteps"] == 5 and spec["training"]["profile"] == "auto"
    assert spec["output"]["checkpointEverySteps"] == 100000
    assert "resources" not in json.loads((tmp_path / "work" / "job-plan-02-tiny_64_-_lean.yaml").read_text())["spec"]
    md = (out / "plan-table.md").read_text()
    assert md.count("\n") == 5 and "tiny-qwen:64:24" in md


def test_cpu_dry_run_restart_resumes_from_the_interrupt_checkpoint(tmp_path):
    """`restart`: run A is SIGTERMed after its step 2 line, writes its interrupt checkpoint and exits 6; run B, the
    same config on the same output, resumes from it and trains the steps after it."""
    env = dict(os.environ, KUBESLOTH_ENGINE="fused", KUBESLOTH_METRICS_PORT="0")
    run = lambda *args: subprocess.run([sys.executable, str(BENCH), *args], env=env, capture_output=True,  # noqa
                                       text=True, timeout=300)
    models, out = tmp_path / "m", tmp_path / "out"
    # Paced (the trainer's test hook) so the SIGTERM lands while steps remain. --build-models: the row's model is
    # built just before it and removed after it (how bench/h200.sh runs it).
    done = run("restart", "--models", str(models), "--build-models", "--evict-page-cache",
               "--rows", "tiny:64:24@KUBESLOTH_TEST_STEP_DELAY_SECONDS=0.3",
               "--out", str(out), "--work", str(tmp_path / "work"), "--cache", str(tmp_path / "cache"),
               "--budget", "240", "--min-row-seconds", "10")
    assert done.returncode == 0, done.stdout + done.stderr
    assert not (models / "tiny").exists() and (models / "data-64.jsonl").is_file()
    row = json.loads((out / "restart-table.json").read_text())["rows"][0]
    assert row["evicted_bytes"] > row["interrupted"]["checkpoint_bytes"]  # the model's files and the checkpoint's
    a, b = row["interrupted"], row["restarted"]
    assert a["exit_code"] == 6 and a["sigterm_at_s"] > 0 and a["sigterm_to_exit_s"] > 0, a
    assert a["checkpoint_bytes"] > 0 and "interrupt" in (a["termination"] or "").lower(), a
    saved = b["resumed"]["step"]
    assert saved >= 2 and max(map(int, a["losses"])) == saved  # the checkpoint holds the last step A finished
    assert b["first_step"] == saved + 1 and b["exit_code"] == -9  # killed after its last step, as rows are
    assert b["resumed"]["at_s"] < b["first_step_s"]
    assert not (tmp_path / "work" / "out-restart-00-tiny_64_24_KUBESLOTH_TEST_STEP_DELAY_SECONDS_0.3").exists()
    assert "| tiny:64:24@" in (out / "restart-table.md").read_text()


def test_h200_shim_maps_every_package_the_project_maps():
    """bench/h200.sh maps the repo onto `kubesloth` with symlinks (no install on the device machine): every
    `kubesloth.X = dir` of pyproject's package-dir must be linked, or the trainer fails to import there."""
    import re
    import tomllib

    mapped = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    wanted = {d for name, d in mapped.items() if name.startswith("kubesloth.") and name.count(".") == 1}
    linked = re.search(r"^for d in ([\w ]+); do ln -sfn", (REPO_ROOT / "bench" / "h200.sh").read_text(), re.M)
    assert linked and wanted <= set(linked[1].split()), (wanted, linked and linked[1])
