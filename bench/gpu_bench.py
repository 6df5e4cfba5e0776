"""GPU benchmark: baselines (plain Unsloth, plain transformers+TRL) and kubesloth's trainer profiles, side by side.

    python bench/gpu_bench.py models --out DIR [--shapes 8b,1b]       # random-init checkpoints + tokenizer + data
    python bench/gpu_bench.py table  --models DIR --shape 8b --rows ROW,ROW,... --out OUTDIR
    python bench/gpu_bench.py issue7 --models DIR --out OUTDIR        # trainer + unsloth engine: ckpt/resume/save

Every run is its own process (Unsloth patches transformers at import; memory peaks must not mix). This process
timestamps each line the child prints and samples NVML (device 0) every 10 ms while the child lives, so every
row is measured the same way whatever the engine:
- time to first step: from spawning the child to its "step 1" line (imports, load, compile, first step);
- tokens/s: input tokens of the steps after the warm-up over the time between the warm-up's last step line and
  the last one (sequences are exactly maxSeqLength tokens, no padding);
- MFU(6N) = 6 x parameters x tokens/s / 790e12 (the bf16 matmul rate measured on the H200);
- torch reserved peak: the child's torch.cuda.max_memory_reserved(); NVML device peak: the sampler's maximum;
- loss at each step: what the child logs (HF: the step's loss; kubesloth: its progress line).
Trainer rows run `python -m kubesloth.trainer` with a generated FineTuneJob; the bench stops them after their
last timed step (the 16 GB save is the issue7 check's business, not a throughput row's).

Data: 8 rows of exactly 2048 tokens of seeded random word ids; every engine gets the same token ids (baselines
take them pre-tokenized from kubesloth's own data pipeline). With 8 rows and 8 sequences a step every step is a
whole epoch, so the batch is the same whatever order a sampler picks: losses at equal steps are comparable.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PEAK_FLOPS = 790e12  # bf16 dense matmul, measured on this H200 (KINDS.md: 769-798 TFLOP/s)
SEQ = 2048
ROWS_IN_DATA = 8
SEED = 3407
LR = 1e-5  # small enough that the loss stays far from 0 over the table's steps (1e-4 memorises in 4)

SHAPES = {
    # Llama-3.1-8B and Llama-3.2-1B shapes (vocab 128256, GQA 8 KV heads, rope_theta 500000).
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=False),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=True),
    # For a dry run of the harness on a CPU machine (trainer rows only: TRL's SFTTrainer needs a GPU).
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=False),
}
VOCAB = 128256
SPECIAL = ["<|bos|>", "<|eos|>", "<|pad|>"]

# Rows of the table: what runs, its batch (sequences x accumulation) and its kind.
ROWS = {
    "unsloth-1x4": dict(kind="baseline", engine="unsloth", batch=1, accum=4),  # the article's lean settings
    "unsloth-8x1": dict(kind="baseline", engine="unsloth", batch=8, accum=1),
    "hf-1x4": dict(kind="baseline", engine="hf", batch=1, accum=4),
    "hf-8x1": dict(kind="baseline", engine="hf", batch=8, accum=1),
    "lean": dict(kind="trainer", profile="lean", batch=8, accum=1),
    "lean-24g": dict(kind="trainer", profile="lean", batch=8, accum=1, gpu_memory_gib=24),
    "fast": dict(kind="trainer", profile="fast", batch=8, accum=1, gpu_memory_gib=80),
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- models and data ------------------------------------------------------------------------------------------

def build_tokenizer(out: Path):
    """A word-level tokenizer whose vocabulary is exactly the model's: token i is the word `t{i}`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    vocab.update({f"t{i}": i for i in range(len(SPECIAL), VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL[2]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL[0], eos_token=SPECIAL[1],
                                   pad_token=SPECIAL[2])
    fast.model_max_length = 131072
    fast.save_pretrained(out)
    return fast


def build_model(shape: str, out: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out / "config.json").is_file():
        log(f"{shape}: {out} exists")
        return out
    t0 = time.time()
    config = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                         bos_token_id=0, eos_token_id=1, pad_token_id=2, use_cache=False, **SHAPES[shape])
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.config.torch_dtype = torch.bfloat16
    model.save_pretrained(out, safe_serialization=True)
    build_tokenizer(out)
    n = sum(p.numel() for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    log(f"{shape}: {n / 1e9:.3f}B parameters written to {out} in {time.time() - t0:.1f}s")
    return out


def build_data(path: Path) -> Path:
    import random

    rng = random.Random(SEED)
    with path.open("w") as handle:
        for _ in range(ROWS_IN_DATA):
            words = " ".join(f"t{rng.randrange(len(SPECIAL), VOCAB)}" for _ in range(SEQ + 64))
            handle.write(json.dumps({"text": words}) + "\n")
    return path


def cmd_models(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for shape in args.shapes.split(","):
        build_model(shape, out / shape)
    build_data(out / "data.jsonl")
    return 0


def param_count(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in model_dir.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                total += math.prod(handle.get_slice(name).get_shape())
    return total


# --- NVML sampler and child runner ----------------------------------------------------------------------------

class NvmlPeak:
    """Device 0's used memory (all processes), sampled every 10 ms; None everywhere without NVML (dry runs)."""

    def __init__(self, interval: float = 0.01):
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:
            self.nvml = None
        self.interval = interval
        self.peak = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def used(self):
        return int(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used) if self.nvml else None

    def reset(self) -> None:
        self.peak = self.used()

    def _run(self) -> None:
        while self.nvml and not self._stop.wait(self.interval):
            self.peak = max(self.peak or 0, self.used())

    def stop(self) -> None:
        self._stop.set()


BASELINE_STEP = re.compile(r"^BENCH step (\d+) loss (\S+)")
BASELINE_MEM = re.compile(r"^BENCH memory reserved_peak=(\d+) allocated_peak=(\d+)")
TRAINER_STEP = re.compile(r"\[trainer\] step (\d+)/(\d+) loss (\S+) .*gpu reserved (\S+)GiB peak (\S+)GiB")


def run_child(name: str, argv: list[str], env: dict, cwd: Path, log_path: Path, nvml: NvmlPeak,
              last_step: int, timeout: float) -> dict:
    """Run one row's process; returns its step timestamps/losses, peaks and exit status."""
    steps: dict[int, tuple[float, float]] = {}
    reserved_peak = None
    done_at = None
    nvml.reset()
    idle_used = nvml.used()
    spawned = time.time()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True)
    timer = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
    timer.start()
    killed_after_last = False
    with log_path.open("w") as out:
        for line in proc.stdout:
            now = time.time()
            out.write(f"{now - spawned:9.3f} {line}")
            m = BASELINE_STEP.match(line) or TRAINER_STEP.search(line)
            if m:
                step, loss = int(m[1]), float(m[3] if m.re is TRAINER_STEP else m[2])
                steps[step] = (now - spawned, loss)
                if m.re is TRAINER_STEP:
                    reserved_peak = int(float(m[5]) * 2**30)
                if m.re is TRAINER_STEP and step >= last_step and not killed_after_last:
                    # Measured: stop the trainer instead of letting it save 16 GB (see the module doc).
                    done_at = now - spawned
                    killed_after_last = True
                    os.killpg(proc.pid, signal.SIGKILL)
            m = BASELINE_MEM.match(line)
            if m:
                reserved_peak = int(m[1])
    code = proc.wait()
    timer.cancel()
    return {"name": name, "exit_code": code, "timed_out": code == -9 and not killed_after_last,
            "steps": {k: v for k, v in sorted(steps.items())}, "torch_reserved_peak": reserved_peak,
            "nvml_peak": nvml.peak, "nvml_idle": idle_used, "wall": time.time() - spawned, "done_at": done_at}


def summarise(row: dict, params: int, warmup: int, seqs_per_step: int) -> dict:
    steps = row["steps"]
    out = {k: row[k] for k in ("name", "exit_code", "timed_out", "torch_reserved_peak", "nvml_peak", "wall")}
    out["losses"] = {k: v[1] for k, v in steps.items()}
    out["first_step_s"] = steps[1][0] if 1 in steps else None
    last = max(steps) if steps else 0
    if warmup in steps and last > warmup:
        seconds = steps[last][0] - steps[warmup][0]
        tokens = (last - warmup) * seqs_per_step * SEQ
        out["tokens_per_s"] = tokens / seconds
        out["mfu"] = 6 * params * out["tokens_per_s"] / PEAK_FLOPS
        out["timed_steps"] = last - warmup
    else:
        out["tokens_per_s"] = out["mfu"] = None
    return out


# --- baseline child -------------------------------------------------------------------------------------------

def cmd_child_baseline(args) -> int:
    """One baseline run: plain Unsloth (FastLanguageModel + its SFTTrainer) or plain transformers + TRL."""
    if args.engine == "unsloth":
        os.environ.setdefault("UNSLOTH_DISABLE_CPU_FALLBACK", "1")
        import unsloth  # noqa: F401  (first)
        from unsloth import FastLanguageModel
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from kubesloth.trainer.data import build_training_data  # PYTHONPATH: the repo as a package (bench/h200.sh)

    model_dir = Path(args.model)
    if args.engine == "unsloth":
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=str(model_dir), max_seq_length=SEQ, dtype=torch.bfloat16, load_in_4bit=False,
            load_in_8bit=False, full_finetuning=True, use_gradient_checkpointing="unsloth")
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa",
                                                     local_files_only=True).cuda()
    model.config.use_cache = False
    data = build_training_data([Path(args.data)], fmt="text", text_field="text", max_samples=None,
                               tokenizer=tokenizer, max_seq_length=SEQ, packing=False)
    dataset = Dataset.from_dict({"input_ids": [row[0] for row in data.rows]})

    class Report(TrainerCallback):
        def on_log(self, _args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                torch.cuda.synchronize()
                print(f"BENCH step {state.global_step} loss {logs['loss']:.6f}", flush=True)

    config = SFTConfig(
        output_dir=str(Path(args.workdir) / f"sft-{args.engine}"), per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.accum, max_steps=args.steps, learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        optim="paged_adamw_8bit", bf16=True, logging_steps=1, save_strategy="no", report_to="none", seed=SEED,
        gradient_checkpointing=args.engine == "hf", gradient_checkpointing_kwargs={"use_reentrant": False},
        max_length=SEQ, packing=False, disable_tqdm=True, dataloader_num_workers=0)
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[Report()])
    trainer.train()
    print(f"BENCH memory reserved_peak={torch.cuda.max_memory_reserved()} "
          f"allocated_peak={torch.cuda.max_memory_allocated()}", flush=True)
    return 0


# --- the table ------------------------------------------------------------------------------------------------

def trainer_job(model_dir: Path, data: Path, out: Path, spec_row: dict, steps: int, checkpoint_every: int,
                name: str, profile: str = None, training_extra: dict = None) -> dict:
    training = {"profile": profile or spec_row["profile"], "maxSteps": steps, "learningRate": LR,
                "lrScheduler": "constant", "warmupRatio": 0.0, "weightDecay": 0.0, "maxGradNorm": 1.0,
                "seed": SEED, "loggingSteps": 1, **(training_extra or {})}
    job = {"apiVersion": "kubesloth.io/v1alpha1", "kind": "FineTuneJob",
           "metadata": {"name": name, "namespace": "bench"},
           "spec": {"model": {"source": f"file://{model_dir}", "maxSeqLength": SEQ},
                    "dataset": {"source": f"file://{data}", "format": "text", "textField": "text"},
                    "training": training,
                    "output": {"destination": f"file://{out}", "checkpointEverySteps": checkpoint_every,
                               "checkpointsToKeep": 2}}}
    if spec_row.get("gpu_memory_gib"):
        job["spec"]["resources"] = {"gpuMemoryGiB": spec_row["gpu_memory_gib"]}
    return job


def child_env(cache: Path, extra: dict = None) -> dict:
    env = dict(os.environ)
    env.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                # Compile caches on one persistent path: the first run fills them (cold), later ones reuse them.
                "UNSLOTH_COMPILE_LOCATION": str(cache / "unsloth_compiled_cache"),
                "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "TRITON_CACHE_DIR": str(cache / "triton"),
                "KUBESLOTH_METRICS_PORT": "0"})
    env.update(extra or {})
    return env


def row_command(row: str, spec_row: dict, model_dir: Path, data: Path, work: Path, steps: int,
                run_id: str) -> tuple[list[str], dict]:
    if spec_row["kind"] == "baseline":
        return ([sys.executable, str(Path(__file__).resolve()), "_child-baseline", "--engine", spec_row["engine"],
                 "--model", str(model_dir), "--data", str(data), "--batch", str(spec_row["batch"]), "--accum",
                 str(spec_row["accum"]), "--steps", str(steps), "--workdir", str(work)], {})
    out = work / f"out-{run_id}"
    job = trainer_job(model_dir, data, out, spec_row, steps, checkpoint_every=100000, name=f"bench-{row}")
    config = work / f"job-{run_id}.yaml"
    config.write_text(json.dumps(job))
    extra = {"KUBESLOTH_TERMINATION_LOG": str(work / f"termination-{run_id}")}
    if spec_row.get("tuning"):
        extra["KUBESLOTH_FUSED_TUNING"] = json.dumps(spec_row["tuning"])
    return [sys.executable, "-m", "kubesloth.trainer", "--config", str(config)], extra


def parse_rows(text: str) -> list[tuple[str, dict]]:
    """ROW or ROW@key=value+key=value (fused-engine tuning, e.g. fast@uncheckpointed_layers=12); rows may
    repeat (repeats are how the noise is shown)."""
    rows = []
    for item in text.split(","):
        name, _, tuning = item.partition("@")
        if name not in ROWS:
            raise SystemExit(f"unknown row {name!r} (known: {', '.join(ROWS)})")
        spec_row = dict(ROWS[name])
        if tuning:
            spec_row["tuning"] = dict(kv.split("=", 1) for kv in tuning.split("+"))
            for key, value in spec_row["tuning"].items():
                spec_row["tuning"][key] = int(value) if value.isdigit() else value
            name = f"{name}@{tuning}"
        rows.append((name, spec_row))
    return rows


def fmt_gib(value) -> str:
    return f"{value / 2**30:.1f}" if value else "-"


def markdown(results: list[dict], shape: str, warmup: int, compare_step: int) -> str:
    lines = [f"| row | batch x accum | torch reserved GiB | NVML device GiB | tokens/s | MFU(6N) | first step s | "
             f"cache | loss@1 | loss@{compare_step} | exit |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        tps = f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else "-"
        mfu = f"{r['mfu']:.2f}" if r.get("mfu") else "-"
        first = f"{r['first_step_s']:.1f}" if r.get("first_step_s") else "-"
        l1 = r["losses"].get(1)
        lc = r["losses"].get(compare_step)
        lines.append(f"| {r['name']} | {r['batch']}x{r['accum']} | {fmt_gib(r['torch_reserved_peak'])} | "
                     f"{fmt_gib(r['nvml_peak'])} | {tps} | {mfu} | {first} | {r['cache']} | "
                     f"{l1 if l1 is not None else '-'} | {lc if lc is not None else '-'} | {r['exit_code']} |")
    return "\n".join(lines) + "\n"


def loss_check(results: list[dict], compare_step: int) -> list[str]:
    """Each row's loss at every logged step vs the baseline with the same sequences per step (unsloth first)."""
    notes = []
    for r in results:
        per_step = r["batch"] * r["accum"]
        base = next((b for b in results if b["kind"] == "baseline" and b["batch"] * b["accum"] == per_step
                     and b is not r and b["losses"] and b["name"].startswith("unsloth")), None) or next(
            (b for b in results if b["kind"] == "baseline" and b["batch"] * b["accum"] == per_step
             and b is not r and b["losses"]), None)
        if base is None or not r["losses"]:
            continue
        common = sorted(set(r["losses"]) & set(base["losses"]))
        if not common:
            continue
        worst = max(abs(r["losses"][s] - base["losses"][s]) / abs(base["losses"][s]) for s in common)
        r["loss_vs"] = base["name"]
        r["loss_max_rel_diff"] = worst
        notes.append(f"{r['name']} vs {base['name']}: max relative loss difference {worst * 100:.3f}% over "
                     f"steps {common[0]}..{common[-1]} ({'within' if worst <= 0.01 else 'OUTSIDE'} 1%)")
    return notes


def cmd_table(args) -> int:
    models = Path(args.models)
    model_dir, data = models / args.shape, models / "data.jsonl"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache)
    params = param_count(model_dir)
    nvml = NvmlPeak()
    deadline = time.time() + args.budget
    results = []
    for index, (name, spec_row) in enumerate(parse_rows(args.rows)):
        left = deadline - time.time()
        if left < args.min_row_seconds:
            log(f"{name}: skipped, {left:.0f}s of the budget left")
            continue
        cold = not (cache / "unsloth_compiled_cache").exists()
        run_id = f"{index:02d}-{re.sub('[^A-Za-z0-9_.-]', '_', name)}"
        argv, extra = row_command(name, spec_row, model_dir, data, work, args.steps, run_id)
        log(f"{name}: start ({'cold' if cold else 'warm'} compile cache), {left:.0f}s of budget left")
        raw = run_child(name, argv, child_env(cache, extra), work, out / f"{run_id}.log", nvml,
                        last_step=args.steps, timeout=min(left, args.row_timeout))
        row = summarise(raw, params, args.warmup, spec_row["batch"] * spec_row["accum"])
        row.update(kind=spec_row["kind"], batch=spec_row["batch"], accum=spec_row["accum"],
                   cache="cold" if cold else "warm", tuning=spec_row.get("tuning"),
                   gpu_memory_gib=spec_row.get("gpu_memory_gib"))
        results.append(row)
        log(f"{name}: exit {row['exit_code']}, {row.get('tokens_per_s') or 0:.0f} tok/s, torch reserved "
            f"{fmt_gib(row['torch_reserved_peak'])} GiB, NVML {fmt_gib(row['nvml_peak'])} GiB, first step "
            f"{row['first_step_s'] or 0:.1f}s, wall {row['wall']:.0f}s")
        write_results(out, args, results, params)
    nvml.stop()
    table = write_results(out, args, results, params)
    print(table, flush=True)
    return 0


def write_results(out: Path, args, results: list[dict], params: int) -> str:
    compare = args.steps
    notes = loss_check(results, compare)
    meta = {"shape": args.shape, "parameters": params, "seq": SEQ, "steps": args.steps, "warmup": args.warmup,
            "lr": LR, "seed": SEED, "peak_flops": PEAK_FLOPS, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                   time.gmtime()),
            "versions": versions(), "command": " ".join(sys.argv)}
    (out / f"table-{args.shape}.json").write_text(json.dumps({"meta": meta, "rows": results, "loss_check": notes},
                                                             indent=2, default=str))
    table = markdown(results, args.shape, args.warmup, compare) + "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    (out / f"table-{args.shape}.md").write_text(table)
    return table


def versions() -> dict:
    from importlib import metadata

    found = {}
    for name in ("torch", "transformers", "trl", "unsloth", "unsloth_zoo", "bitsandbytes", "triton", "datasets"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    try:
        import subprocess as sp
        found["gpu"] = sp.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        pass
    return found


# --- issue 7: the trainer's unsloth engine through the entry point: checkpoint, SIGTERM, resume, save --------------

def cmd_issue7(args) -> int:
    models = Path(args.models)
    model_dir, data = models / args.shape, models / "data.jsonl"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    dest = work / "issue7-output"
    cache = Path(args.cache)
    spec_row = {"gpu_memory_gib": None}
    # The article's settings as a custom profile, on the unsloth engine.
    job = trainer_job(model_dir, data, dest, spec_row, args.steps, checkpoint_every=args.checkpoint_every,
                      name="issue7", profile="custom",
                      training_extra={"perDeviceBatchSize": 1, "gradientAccumulationSteps": 4,
                                      "optimizer": "paged_adamw_8bit", "gradientCheckpointing": "unsloth"})
    config = work / "issue7.yaml"
    config.write_text(json.dumps(job))
    env = child_env(cache, {"KUBESLOTH_ENGINE": args.engine,
                            "KUBESLOTH_TERMINATION_LOG": str(work / "issue7-termination")})
    argv = [sys.executable, "-m", "kubesloth.trainer", "--config", str(config)]
    nvml = NvmlPeak()
    report = {"engine": args.engine, "shape": args.shape, "steps": args.steps,
              "checkpoint_every": args.checkpoint_every, "runs": []}
    ckpt_line = re.compile(r"\[trainer\] checkpoint step (\d+) -> ")
    for attempt, stop_after in (("first", args.stop_after), ("resume", None)):
        spawned = time.time()
        nvml.reset()
        proc = subprocess.Popen(argv, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1, start_new_session=True)
        first_step = None
        sent = None
        lines = []
        with (out / f"issue7-{attempt}.log").open("w") as handle:
            for line in proc.stdout:
                now = time.time() - spawned
                handle.write(f"{now:9.3f} {line}")
                lines.append(line.rstrip())
                if first_step is None and TRAINER_STEP.search(line):
                    first_step = now
                m = ckpt_line.search(line)
                if m and stop_after and int(m[1]) >= stop_after and sent is None:
                    proc.send_signal(signal.SIGTERM)  # a pod eviction: checkpoint, exit Interrupted
                    sent = now
        code = proc.wait()
        report["runs"].append({"attempt": attempt, "exit_code": code, "first_step_s": first_step,
                               "sigterm_at_s": sent, "wall_s": time.time() - spawned, "nvml_peak": nvml.peak,
                               "last_lines": lines[-6:]})
        log(f"issue7 {attempt}: exit {code}, first step {first_step}s")
    summary_file = dest / "summary.json"
    if summary_file.is_file():
        report["summary"] = json.loads(summary_file.read_text())
    report["checkpoints"] = sorted(p.name for p in (dest / "checkpoints").iterdir()) if (dest / "checkpoints").is_dir() else []
    report["model_files"] = sorted(p.name for p in (dest / "model").iterdir()) if (dest / "model").is_dir() else []
    nvml.stop()
    (out / "issue7.json").write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps({k: v for k, v in report.items() if k != "summary"}, indent=1, default=str)[:3000])
    if "summary" in report:
        s = report["summary"]
        print(json.dumps({k: s.get(k) for k in ("steps", "resumed_from_step", "tokens_per_second", "final_loss",
                                                 "peak_memory", "train_seconds", "wall_seconds")}, default=str))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("models")
    p.add_argument("--out", required=True)
    p.add_argument("--shapes", default="8b,1b")
    p.set_defaults(func=cmd_models)
    for name, func in (("table", cmd_table), ("issue7", cmd_issue7)):
        p = sub.add_parser(name)
        p.add_argument("--models", required=True)
        p.add_argument("--out", required=True)
        p.add_argument("--work", default="/tmp/bench-work")
        p.add_argument("--cache", default="/tmp/bench-cache", help="persistent compile-cache path")
        p.add_argument("--shape", default="8b" if name == "table" else "1b")
        p.set_defaults(func=func)
        if name == "table":
            p.add_argument("--rows", default="unsloth-1x4,unsloth-8x1,hf-1x4,lean,lean-24g,fast")
            p.add_argument("--steps", type=int, default=13)
            p.add_argument("--warmup", type=int, default=3)
            p.add_argument("--budget", type=float, default=540, help="seconds for all rows")
            p.add_argument("--row-timeout", type=float, default=240)
            p.add_argument("--min-row-seconds", type=float, default=60)
        else:
            p.add_argument("--engine", default="unsloth")
            p.add_argument("--steps", type=int, default=24)
            p.add_argument("--checkpoint-every", type=int, default=8)
            p.add_argument("--stop-after", type=int, default=16)
    p = sub.add_parser("_child-baseline")
    for flag in ("--engine", "--model", "--data", "--workdir"):
        p.add_argument(flag, required=True)
    for flag in ("--batch", "--accum", "--steps"):
        p.add_argument(flag, type=int, required=True)
    p.set_defaults(func=cmd_child_baseline)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
