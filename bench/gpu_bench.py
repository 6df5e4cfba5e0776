"""GPU benchmark: baselines (plain Unsloth, plain transformers+TRL) and kubesloth's trainer profiles, side by side;
and the memory planner's chosen plans through the trainer's entry point (plan-table).

    python bench/gpu_bench.py models --out DIR [--shapes 8b,1b] [--seqs 2048]  # random-init checkpoints + data
    python bench/gpu_bench.py models --out DIR --rows PLAN_ROWS    # only the shapes and seqs the rows name
    python bench/gpu_bench.py table  --models DIR --shape 8b --rows ROW,ROW,... --out OUTDIR
    python bench/gpu_bench.py issue7 --models DIR --out OUTDIR        # trainer + unsloth engine: ckpt/resume/save
    python bench/gpu_bench.py plan-table --models DIR --rows SHAPE:SEQ:BUDGET[:PROFILE],... --out OUTDIR

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
last timed step (the 16 GB save is the issue7 check's business, not a throughput row's). plan-table rows also
record the trainer's `[trainer] plan {JSON}` line (what the planner chose and predicted) beside the measurement.

Tokenizer: a byte-level BPE with no merges (one token per byte under any tokenizer class). Data: 8 rows of seeded
random letters and spaces, longer than the sequence, so every row is exactly maxSeqLength tokens; every engine
gets the same token ids (baselines take them pre-tokenized from kubesloth's own data pipeline). With 8 rows and 8
sequences a step every step is a whole epoch, so the batch is the same whatever order a sampler picks: losses at
equal steps are comparable.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
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

# Random-init shapes (bf16, save_pretrained). `arch` picks the config/model class; the rest are config fields.
SHAPES = {
    # Llama-3.1-8B (vocab 128256, GQA 8 KV heads, rope_theta 500000; 131072 positions so seq 16384 is allowed).
    "8b": dict(arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False, rope_theta=500000.0,
               max_position_embeddings=131072, rms_norm_eps=1e-5),
    # Llama-3.2-1B (tied embeddings).
    "1b": dict(arch="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True, rope_theta=500000.0,
               max_position_embeddings=131072, rms_norm_eps=1e-5),
    # Qwen2.5-7B (7.616 B) and Qwen2.5-1.5B (1.544 B, tied): q/k/v biases, rope_theta 1e6.
    "qwen7b": dict(arch="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                   num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False,
                   rope_theta=1000000.0, max_position_embeddings=32768, rms_norm_eps=1e-6),
    "qwen1.5b": dict(arch="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                     num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True,
                     rope_theta=1000000.0, max_position_embeddings=32768, rms_norm_eps=1e-6),
    # For dry runs of the harness on a CPU machine (trainer rows only: TRL's SFTTrainer needs a GPU).
    "tiny": dict(arch="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500000.0,
                 max_position_embeddings=131072, rms_norm_eps=1e-5),
    "tiny-qwen": dict(arch="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      rope_theta=1000000.0, max_position_embeddings=32768, rms_norm_eps=1e-6),
}
SPECIAL = ["<|bos|>", "<|eos|>", "<|pad|>"]  # ids 0, 1, 2; the 256 byte symbols follow (259 tokens in all)
LETTERS = "abcdefghijklmnopqrstuvwxyz"

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
    """A byte-level BPE with no merges: the specials, then the 256 `ByteLevel.alphabet()` symbols. Every byte is
    one token under any tokenizer class transformers picks for the directory (a Qwen2 directory loads as
    Qwen2Tokenizer, which rebuilds its own BPE pipeline from vocab + merges: a word-level tokenizer.json gave
    ~0-2 tokens a row there; this one still gives one token per byte)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL[0], eos_token=SPECIAL[1],
                                   pad_token=SPECIAL[2], unk_token=None)
    fast.model_max_length = 131072
    fast.save_pretrained(out)
    return fast


def model_config(shape: str):
    from transformers import LlamaConfig, Qwen2Config

    fields = dict(SHAPES[shape])
    arch = fields.pop("arch")
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    return cls(bos_token_id=0, eos_token_id=1, pad_token_id=2, use_cache=False, **fields)


def estimated_params(shape: str) -> int:
    """Parameter count from the shape alone (weights only; norms and biases left out): orders the builds."""
    f = SHAPES[shape]
    hidden, inter, layers = f["hidden_size"], f["intermediate_size"], f["num_hidden_layers"]
    kv_dim = f["num_key_value_heads"] * hidden // f["num_attention_heads"]
    per_layer = 2 * hidden * hidden + 2 * hidden * kv_dim + 3 * hidden * inter
    return layers * per_layer + f["vocab_size"] * hidden * (1 if f["tie_word_embeddings"] else 2)


def build_model(shape: str, out: Path) -> Path:
    import torch
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    if (out / "config.json").is_file():
        log(f"{shape}: {out} exists")
        return out
    t0 = time.time()
    config = model_config(shape)
    cls = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM}[SHAPES[shape]["arch"]]
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = cls(config)
    finally:
        torch.set_default_dtype(torch.float32)
    model.config.dtype = torch.bfloat16
    tmp = out.with_name(out.name + ".partial")  # a build cut short never looks like a finished directory
    model.save_pretrained(tmp, safe_serialization=True)
    build_tokenizer(tmp)
    n = sum(p.numel() for p in model.parameters())
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    tmp.rename(out)
    log(f"{shape}: {n / 1e9:.3f}B ({n:,}) parameters written to {out} in {time.time() - t0:.1f}s")
    return out


def build_model_in_child(shape: str, out: Path) -> None:
    """build_model in a process of its own: it builds on the GPU, and a CUDA context left in this process would be
    counted in every later row's NVML device peak (runs 11, 13 and 14 had it: the restart
    processes showed ~2.07 GiB outside torch where a plan row, built apart, shows ~1.5)."""
    subprocess.run([sys.executable, __file__, "models", "--out", str(out.parent), "--shapes", shape, "--seqs", ""],
                   check=True)


def data_path(models: Path, seq: int) -> Path:
    return models / f"data-{seq}.jsonl"


def build_data(path: Path, seq: int = SEQ) -> Path:
    """ROWS_IN_DATA rows of seeded random lowercase letters and spaces, seq + 64 characters each: one token per
    byte, so after the trainer's BOS and truncation every row is exactly `seq` tokens."""
    import random

    rng = random.Random(SEED + seq)
    alphabet = LETTERS + " " * 5  # words of ~5 letters
    with path.open("w") as handle:
        for _ in range(ROWS_IN_DATA):
            text = "".join(rng.choice(alphabet) for _ in range(seq + 64))
            handle.write(json.dumps({"text": text}) + "\n")
    return path


def shapes_and_seqs(rows: str) -> tuple[list[str], list[int]]:
    """The shapes and sequence lengths plan-table rows name (each once)."""
    shapes, seqs = [], []
    for row in parse_plan_rows(rows):
        if row["shape"] not in shapes:
            shapes.append(row["shape"])
        if row["seq"] not in seqs:
            seqs.append(row["seq"])
    return shapes, seqs


def cmd_models(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shapes = [s for s in args.shapes.split(",") if s]
    seqs = [int(s) for s in args.seqs.split(",") if s]
    if args.rows:
        shapes, seqs = shapes_and_seqs(args.rows)
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown shape(s) {', '.join(unknown)} (known: {', '.join(SHAPES)})")
    # Data first (seconds), then the models smallest first: a build cut short by the time limit still leaves the
    # small ones.
    t0 = time.time()
    build_data(out / "data.jsonl", SEQ)  # the table's and issue7's data (seq 2048)
    for seq in seqs:
        build_data(data_path(out, seq), seq)
    log(f"data for seq {', '.join(map(str, seqs)) or '-'} (+ data.jsonl, seq {SEQ}) in {time.time() - t0:.1f}s")
    for shape in sorted(shapes, key=estimated_params):
        build_model(shape, out / shape)
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
# The trainer's per-step line (trainer/callbacks.py ProgressLog): `[trainer] step 3/8 loss 11.9 lr ... tok/s ...
# epoch ... eta ...s mem gpu reserved 18.61GiB peak 18.62GiB device 35.01GiB` on a GPU, `... mem rss 0.45GiB` on
# CPU; a counter it has no value for is `-`.
TRAINER_STEP = re.compile(r"\[trainer\] step (\d+)/(\d+) loss (\S+) ")
TRAINER_GPU = re.compile(r" mem gpu reserved (\S+) peak (\S+)")
# The trainer's memory plan, one line at setup: `[trainer] plan {JSON}` (keys may grow; parse_plan).
TRAINER_PLAN = re.compile(r"\[trainer\] plan (\{.*)$")
# Fallbacks for the sequences per step when there is no plan line: the fused engine's plan description, else the
# entry point's `batch B x accumulation A`.
TRAINER_FUSED = re.compile(r"\[trainer\] fused step on \S+: optimizer states (\S+), (\d+) sequences per step"
                           r"(?:.*?, (\d+) decoder layers without checkpointing)?"
                           r"(?:.*?torch memory cap ([0-9.]+) GiB)?")
TRAINER_BATCH = re.compile(r"\[trainer\] engine \S+; profile \S+: batch (\d+) x accumulation (\d+)")


def gib_bytes(text: str):
    """`18.61GiB` -> bytes; `-` (or anything else) -> None."""
    m = re.fullmatch(r"([0-9.]+)GiB", text)
    return int(float(m[1]) * 2**30) if m else None


def trainer_step(line: str):
    """(step, total, loss, torch reserved peak bytes or None) of a trainer step line, else None."""
    m = TRAINER_STEP.search(line)
    if not m:
        return None
    try:
        loss = float(m[3])
    except ValueError:
        loss = math.nan
    gpu = TRAINER_GPU.search(line)
    return int(m[1]), int(m[2]), loss, gib_bytes(gpu[2]) if gpu else None


def parse_plan(line: str):
    """The JSON object of a `[trainer] plan {JSON}` line (any keys; text after the object is ignored), else None."""
    m = TRAINER_PLAN.search(line.rstrip("\n"))
    if not m:
        return None
    try:
        value, _end = json.JSONDecoder().raw_decode(m[1])
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def run_child(name: str, argv: list[str], env: dict, cwd: Path, log_path: Path, nvml: NvmlPeak,
              last_step: int, timeout: float, on_line=None, interrupt_at: int = None) -> dict:
    """Run one row's process; returns its step timestamps/losses, peaks and exit status. on_line(line, seconds
    since spawn) sees every line the child prints. interrupt_at: SIGTERM the child once its step line
    `interrupt_at` is seen (a preemption: it writes its interrupt checkpoint and exits 6) instead of killing it
    after `last_step`; `interrupted_at` / the wall give the time it took to stop."""
    steps: dict[int, tuple[float, float]] = {}
    reserved_peak = None
    done_at = None
    nvml.reset()
    idle_used = nvml.used()
    spawned = time.time()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True)
    timer = threading.Timer(max(timeout, 1.0), lambda: _kill_group(proc))
    timer.start()
    killed_after_last = False
    interrupted_at = None
    with log_path.open("w") as out:
        for line in proc.stdout:
            now = time.time()
            out.write(f"{now - spawned:9.3f} {line}")
            if on_line:
                on_line(line, now - spawned)
            m = BASELINE_STEP.match(line)
            parsed = trainer_step(line) if not m else None
            if m:
                steps[int(m[1])] = (now - spawned, float(m[2]))
            elif parsed:
                step, _total, loss, peak = parsed
                steps[step] = (now - spawned, loss)
                if peak is not None:
                    reserved_peak = peak
                if interrupt_at is not None:
                    if step >= interrupt_at and interrupted_at is None:
                        interrupted_at = now - spawned
                        _signal_group(proc, signal.SIGTERM)
                elif step >= last_step and not killed_after_last:
                    # Measured: stop the trainer instead of letting it save 16 GB (see the module doc).
                    done_at = now - spawned
                    killed_after_last = True
                    _kill_group(proc)
            m = BASELINE_MEM.match(line)
            if m:
                reserved_peak = int(m[1])
    code = proc.wait()
    timer.cancel()
    return {"name": name, "exit_code": code, "timed_out": code == -9 and not killed_after_last,
            "killed_after_last": killed_after_last,
            "steps": {k: v for k, v in sorted(steps.items())}, "torch_reserved_peak": reserved_peak,
            "nvml_peak": nvml.peak, "nvml_idle": idle_used, "wall": time.time() - spawned, "done_at": done_at,
            "interrupted_at": interrupted_at}


def _signal_group(proc, sig) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _kill_group(proc) -> None:
    _signal_group(proc, signal.SIGKILL)


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
                name: str, profile: str = None, training_extra: dict = None, seq: int = SEQ) -> dict:
    training = {"profile": profile or spec_row["profile"], "maxSteps": steps, "learningRate": LR,
                "lrScheduler": "constant", "warmupRatio": 0.0, "weightDecay": 0.0, "maxGradNorm": 1.0,
                "seed": SEED, "loggingSteps": 1, **(training_extra or {})}
    job = {"apiVersion": "kubesloth.io/v1alpha1", "kind": "FineTuneJob",
           "metadata": {"name": name, "namespace": "bench"},
           "spec": {"model": {"source": f"file://{model_dir}", "maxSeqLength": seq},
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


def _versions_once() -> dict:
    global _VERSIONS
    if _VERSIONS is None:
        _VERSIONS = versions()
    return _VERSIONS


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


# --- plan-table: the memory planner's chosen plans, through the trainer's entry point --------------------------

PROFILES = ("auto", "lean", "fast", "custom")


def parse_plan_rows(text: str) -> list[dict]:
    """`SHAPE:SEQ:BUDGET[:PROFILE][@NAME=VALUE+NAME=VALUE]`, comma-separated (rows may repeat). BUDGET is
    resources.gpuMemoryGiB in GiB, or `-` for none (the card); PROFILE defaults to auto; after `@`, environment
    variables for that row's trainer (a start-up experiment, e.g. `@UNSLOTH_ALLOW_CPU=1`)."""
    rows = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        spec, _, env_text = item.partition("@")
        env = {}
        for pair in filter(None, env_text.split("+")):
            key, eq, value = pair.partition("=")
            if not eq or not re.fullmatch(r"[A-Z_][A-Z0-9_]*", key):
                raise SystemExit(f"plan row {item!r}: after @, NAME=VALUE pairs joined by + (e.g. @UNSLOTH_X=1)")
            env[key] = value
        parts = spec.split(":")
        if len(parts) not in (3, 4):
            raise SystemExit(f"plan row {item!r}: expected SHAPE:SEQ:BUDGET[:PROFILE], e.g. 8b:16384:24")
        shape, seq_text, budget_text = parts[:3]
        profile = parts[3] if len(parts) == 4 else "auto"
        if shape not in SHAPES:
            raise SystemExit(f"plan row {item!r}: unknown shape {shape!r} (known: {', '.join(SHAPES)})")
        if not seq_text.isdigit() or not 16 <= int(seq_text) <= SHAPES[shape]["max_position_embeddings"]:
            raise SystemExit(f"plan row {item!r}: SEQ must be 16..{SHAPES[shape]['max_position_embeddings']}")
        if budget_text.lower() in ("-", "none", ""):
            budget = None
        else:
            try:
                budget = float(budget_text)
            except ValueError:
                budget = -1.0
            if not 0 < budget <= 4096:
                raise SystemExit(f"plan row {item!r}: BUDGET must be GiB in (0, 4096] or '-'")
            budget = int(budget) if budget.is_integer() else budget
        if profile not in PROFILES:
            raise SystemExit(f"plan row {item!r}: unknown profile {profile!r} (known: {', '.join(PROFILES)})")
        rows.append({"row": item, "shape": shape, "seq": int(seq_text), "budget_gib": budget, "profile": profile,
                     "env": env})
    if not rows:
        raise SystemExit("no plan rows given")
    return rows


class PlanWatch:
    """What a trainer child says about its plan: the `[trainer] plan {JSON}` line (the last one wins), the engine
    and resolved profile, the fallbacks for the sequences per step, and the last lines (for failures)."""

    def __init__(self, keep: int = 8):
        self.plan = None
        self.plan_at = None
        self.described = None  # the fused engine's plan description (`fused step on cuda: ...`)
        self.batch = None
        self.engine = None
        self.profile = None
        self.tail: list[str] = []
        self.keep = keep

    def __call__(self, line: str, seconds: float) -> None:
        text = line.rstrip("\n")
        plan = parse_plan(text)
        if plan is not None:
            self.plan, self.plan_at = plan, seconds
        m = TRAINER_FUSED.search(text)
        if m:
            self.described = {"placement": m[1], "sequences_per_step": int(m[2]),
                              "uncheckpointed_layers": int(m[3] or 0),
                              "torch_cap_bytes": int(float(m[4]) * 2**30) if m[4] else None}
        m = TRAINER_BATCH.search(text)
        if m:
            self.batch = int(m[1]) * int(m[2])
            engine = re.search(r"\[trainer\] engine (\S+); profile (\S+):", text)
            self.engine, self.profile = engine[1], engine[2]
        self.tail = (self.tail + [text[:400]])[-self.keep:]

    def sequences_per_step(self) -> tuple[int | None, str | None]:
        if self.plan and isinstance(self.plan.get("sequences_per_step"), int):
            return self.plan["sequences_per_step"], "plan"
        if self.described:
            return self.described["sequences_per_step"], "fused plan description"
        if self.batch:
            return self.batch, "batch x accumulation"
        return None, None


def step_tokens(step: int, sequences_per_step: int, seq: int, rows: int = ROWS_IN_DATA) -> int:
    """Tokens trained at `step` (1-based): every data row is exactly `seq` tokens, and an epoch's last batch has
    the rows left over (trainer engines: `batches_from`), so a step trains min(seqs, rows left) rows."""
    per_epoch = max(math.ceil(rows / sequences_per_step), 1)
    index = (step - 1) % per_epoch
    return min(sequences_per_step, rows - index * sequences_per_step) * seq


def rel_error(predicted, measured):
    """(predicted - measured) / measured; None when either is missing."""
    if predicted is None or not measured:
        return None
    try:
        return (float(predicted) - float(measured)) / float(measured)
    except (TypeError, ValueError):
        return None


def summarise_plan_row(row: dict, raw: dict, watch: PlanWatch, params: int, warmup: int) -> dict:
    steps = raw["steps"]
    plan = watch.plan
    seqs, seqs_from = watch.sequences_per_step()
    predicted = plan.get("predicted") if plan and isinstance(plan.get("predicted"), dict) else None
    # The plan line's fields, else what the fused engine's description line says (same meaning, less of it).
    chosen = plan or watch.described or {}
    out = dict(row)
    out.update(params=params, engine=watch.engine, resolved_profile=watch.profile, plan=plan,
               plan_at_s=watch.plan_at, described=watch.described, placement=chosen.get("placement"),
               sequences_per_step=seqs, sequences_per_step_from=seqs_from,
               uncheckpointed_layers=chosen.get("uncheckpointed_layers"), budget_bytes=chosen.get("budget_bytes"),
               torch_cap_bytes=chosen.get("torch_cap_bytes"), fits=(plan or {}).get("fits"),
               optimizer=(plan or {}).get("optimizer"),
               predicted=None if predicted is None else {
                   k: predicted.get(k) for k in ("torch_reserved_bytes", "device_bytes", "tokens_per_second")})
    for key in ("exit_code", "timed_out", "killed_after_last", "torch_reserved_peak", "nvml_peak", "nvml_idle",
                "wall"):
        out[key] = raw.get(key)
    out["losses"] = {k: v[1] for k, v in steps.items()}
    out["step_times"] = {k: round(v[0], 3) for k, v in steps.items()}
    out["first_step_s"] = steps[1][0] if 1 in steps else None
    last = max(steps) if steps else 0
    out["tokens_per_s"] = out["mfu"] = out["timed_steps"] = None
    if seqs and warmup in steps and last > warmup and steps[last][0] > steps[warmup][0]:
        tokens = sum(step_tokens(k, seqs, row["seq"]) for k in range(warmup + 1, last + 1))
        out["tokens_per_s"] = tokens / (steps[last][0] - steps[warmup][0])
        out["mfu"] = 6 * params * out["tokens_per_s"] / PEAK_FLOPS
        out["timed_steps"] = last - warmup
    p = out["predicted"] or {}
    out["err_torch_reserved"] = rel_error(p.get("torch_reserved_bytes"), out["torch_reserved_peak"])
    out["err_device"] = rel_error(p.get("device_bytes"), out["nvml_peak"])
    out["err_tokens_per_s"] = rel_error(p.get("tokens_per_second"), out["tokens_per_s"])
    out["tail"] = watch.tail
    return out


def wait_for_drain(nvml: NvmlPeak, baseline, slack: int = 1 << 30, limit: float = 15.0) -> float:
    """After a killed child, wait (at most `limit` s) until the device is back near `baseline` used bytes, so the
    next row's NVML peak does not include the last one's memory; returns the seconds waited."""
    if baseline is None or nvml.used() is None:
        return 0.0
    t0 = time.time()
    while nvml.used() > baseline + slack and time.time() - t0 < limit:
        time.sleep(0.2)
    return time.time() - t0


def row_trainer_run(kind: str, index: int, row: dict, model_dir: Path, data: Path, work: Path,
                    steps: int) -> tuple[str, Path, list[str]]:
    """A plan row as the trainer runs it: (run id, its output folder, the trainer's argv over the written job)."""
    run_id = f"{kind}-{index:02d}-{re.sub('[^A-Za-z0-9_.-]', '_', row['row'])}"
    output = work / f"out-{run_id}"
    job = trainer_job(model_dir, data, output, {"gpu_memory_gib": row["budget_gib"]}, steps,
                      checkpoint_every=100000, name=f"bench-{kind}-{index:02d}", profile=row["profile"],
                      seq=row["seq"])
    config = work / f"job-{run_id}.yaml"
    config.write_text(json.dumps(job))
    return run_id, output, [sys.executable, "-m", "kubesloth.trainer", "--config", str(config)]


def cmd_plan_table(args) -> int:
    models = Path(args.models)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    rows = parse_plan_rows(args.rows)
    steps = args.warmup + args.timed
    nvml = NvmlPeak()
    baseline = nvml.used()
    deadline = time.time() + args.budget
    params: dict[str, int] = {}
    seen_arch: set[str] = set()
    results: list[dict] = []
    for index, row in enumerate(rows):
        name = row["row"]
        left = deadline - time.time()
        model_dir, data = models / row["shape"], data_path(models, row["seq"])
        missing = [str(p) for p in (model_dir / "config.json", data) if not p.is_file()]
        if left < args.min_row_seconds or missing:
            why = f"{left:.0f}s of the budget left" if not missing else f"missing {', '.join(missing)}"
            log(f"{name}: skipped, {why}")
            results.append({**row, "skipped": why})
            write_plan_results(out, args, results)
            continue
        if row["shape"] not in params:
            params[row["shape"]] = param_count(model_dir)
        arch = SHAPES[row["shape"]]["arch"]
        marker = cache / f".bench-warm-{arch}"
        cold = arch not in seen_arch and not marker.exists()
        run_id, _, argv = row_trainer_run("plan", index, row, model_dir, data, work, steps)
        termination = work / f"termination-{run_id}"
        termination.unlink(missing_ok=True)
        extra = {"KUBESLOTH_TERMINATION_LOG": str(termination)}
        if args.engine:
            extra["KUBESLOTH_ENGINE"] = args.engine
        extra.update(row["env"])
        timeout = min(left, args.row_timeout)
        log(f"{name}: start ({'cold' if cold else 'warm'} {arch} compile cache), {left:.0f}s of budget left, "
            f"row timeout {timeout:.0f}s")
        watch = PlanWatch()
        raw = run_child(name, argv, child_env(cache, extra), work, out / f"{run_id}.log", nvml, last_step=steps,
                        timeout=timeout, on_line=watch)
        result = summarise_plan_row(row, raw, watch, params[row["shape"]], args.warmup)
        result.update(arch=arch, cache="cold" if cold else "warm", log=f"{run_id}.log",
                      termination=termination.read_text()[:600] if termination.is_file() else None)
        if result["first_step_s"] is not None:
            seen_arch.add(arch)
            marker.touch()
        results.append(result)
        waited = wait_for_drain(nvml, baseline, limit=max(min(15.0, deadline - time.time()), 0.0))
        log(f"{name}: exit {result['exit_code']}{' (timed out)' if result['timed_out'] else ''}, plan "
            f"{plan_text(result)}, {result['tokens_per_s'] or 0:.0f} tok/s, torch reserved "
            f"{fmt_gib(result['torch_reserved_peak'])} GiB, NVML {fmt_gib(result['nvml_peak'])} GiB, first step "
            f"{result['first_step_s'] or 0:.1f}s, wall {result['wall']:.0f}s (+{waited:.1f}s drain)")
        write_plan_results(out, args, results)
    nvml.stop()
    table = write_plan_results(out, args, results)
    print(table, flush=True)
    return 0


def plan_text(r: dict) -> str:
    if not r.get("plan") and not r.get("sequences_per_step"):
        return "-"
    parts = [str(r.get("placement") or "?"), f"{r.get('sequences_per_step') or '?'} seq/step"]
    if r.get("uncheckpointed_layers"):
        parts.append(f"{r['uncheckpointed_layers']} layers unckpt")
    if r.get("torch_cap_bytes"):
        parts.append(f"torch cap {r['torch_cap_bytes'] / 2**30:.1f}G")
    if r.get("fits") is False:
        parts.append("predicted NOT to fit")
    if not r.get("plan"):
        parts.append("(no plan line" + (": from the engine's description)" if r.get("described") else ")"))
    return ", ".join(parts)


def _pct(value) -> str:
    return f"{value * 100:+.1f}%" if value is not None else "-"


def _trio(predicted, measured, error, fmt) -> str:
    p = fmt(predicted) if predicted is not None else "-"
    m = fmt(measured) if measured is not None else "-"
    return f"{p} / {m} ({_pct(error)})"


def plan_markdown(results: list[dict]) -> str:
    lines = ["| row | params | engine / profile | plan | torch GiB pred / meas (err) | device GiB pred / NVML "
             "(err) | tokens/s pred / meas (err) | MFU(6N) | first step s | cache | loss first → last | exit |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def gib(v):
        return f"{v / 2**30:.1f}"

    def rate(v):
        return f"{v:.0f}"

    for r in results:
        if r.get("skipped"):
            lines.append(f"| {r['row']} | | | skipped: {r['skipped']} | | | | | | | | |")
            continue
        p = r.get("predicted") or {}
        losses = r.get("losses") or {}
        loss = f"{losses[min(losses)]:.4f} → {losses[max(losses)]:.4f}" if losses else "-"
        code = r["exit_code"]
        exit_text = (f"ok (killed after step {max(losses)})" if r.get("killed_after_last")
                     else f"{code}, timed out" if r.get("timed_out") else str(code))
        cells = [
            r["row"], f"{r['params'] / 1e9:.2f}B" if r["params"] >= 1e8 else f"{r['params'] / 1e6:.2f}M",
            f"{r.get('engine') or '-'} / {r.get('resolved_profile') or '-'}",
            plan_text(r),
            _trio(p.get("torch_reserved_bytes"), r.get("torch_reserved_peak"), r.get("err_torch_reserved"), gib),
            _trio(p.get("device_bytes"), r.get("nvml_peak"), r.get("err_device"), gib),
            _trio(p.get("tokens_per_second"), r.get("tokens_per_s"), r.get("err_tokens_per_s"), rate),
            f"{r['mfu']:.2f}" if r.get("mfu") is not None else "-",
            f"{r['first_step_s']:.1f}" if r.get("first_step_s") is not None else "-",
            r.get("cache", "-"), loss, exit_text]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


_VERSIONS = None


def write_plan_results(out: Path, args, results: list[dict]) -> str:
    meta = {"rows": args.rows, "warmup": args.warmup, "timed": args.timed, "steps": args.warmup + args.timed,
            "data_rows": ROWS_IN_DATA, "lr": LR, "seed": SEED, "peak_flops": PEAK_FLOPS, "budget_s": args.budget,
            "row_timeout_s": args.row_timeout, "engine": args.engine or os.environ.get("KUBESLOTH_ENGINE"),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "versions": _versions_once(),
            "command": " ".join(sys.argv)}
    (out / "plan-table.json").write_text(json.dumps({"meta": meta, "rows": results}, indent=2, default=str))
    table = plan_markdown(results)
    (out / "plan-table.md").write_text(table)
    return table


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


RESUMING = re.compile(r"resuming from (\S+) \(step (\d+)\)")


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def evict_page_cache(*folders: Path) -> int:
    """Drops the files under folders from the page cache (posix_fadvise DONTNEED after fsync: no root needed, as
    /proc/sys/vm/drop_caches would); returns their bytes. Pages mapped by a live process stay."""
    total = 0
    for folder in folders:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                size = os.fstat(fd).st_size
                os.posix_fadvise(fd, 0, size, os.POSIX_FADV_DONTNEED)
                total += size
            finally:
                os.close(fd)
    return total


def cmd_restart(args) -> int:
    """A preempted run and its restart, per plan row: run A trains to step --interrupt-at, gets SIGTERM (what a
    preemption or drain sends), writes its interrupt checkpoint and exits 6; run B is the same config on the same
    output (the restarted pod): it resumes from that checkpoint. Timed: A's SIGTERM -> exit (the checkpoint
    write), B's spawn -> `resuming from` line -> first step. Caches are warm for B (A filled them)."""
    models, out, work, cache = Path(args.models), Path(args.out), Path(args.work), Path(args.cache)
    for d in (out, work, cache) + ((models,) if args.build_models else ()):
        d.mkdir(parents=True, exist_ok=True)
    rows = parse_plan_rows(args.rows)
    nvml = NvmlPeak()
    deadline = time.time() + args.budget
    results: list[dict] = []
    for index, row in enumerate(rows):
        name = row["row"]
        left = deadline - time.time()
        model_dir, data = models / row["shape"], data_path(models, row["seq"])
        if args.build_models and left >= args.min_row_seconds:
            # One model and one checkpoint on the disk at a time (the H200's 8B model 16 GB + checkpoint 30 GB, of
            # ~49 GiB free): each row's shape is built just before it, and removed after its last row.
            if not data.is_file():
                build_data(data, row["seq"])
            if not (model_dir / "config.json").is_file():
                build_model_in_child(row["shape"], model_dir)
            left = deadline - time.time()
        if left < args.min_row_seconds or not (model_dir / "config.json").is_file() or not data.is_file():
            log(f"{name}: skipped ({left:.0f}s left)")
            results.append({**row, "skipped": f"{left:.0f}s of the budget left"})
            continue
        steps = args.interrupt_at + args.after
        run_id, output, argv = row_trainer_run("restart", index, row, model_dir, data, work, steps)
        result = {**row, "interrupt_at": args.interrupt_at}
        for phase in ("interrupted", "restarted"):
            if phase == "restarted" and args.evict_page_cache:
                # A pod restarted on another node finds neither the model nor the checkpoint in its page cache.
                result["evicted_bytes"] = evict_page_cache(model_dir, output)
                log(f"{name}: {result['evicted_bytes'] / 2**30:.1f} GiB of model and checkpoint evicted from the "
                    "page cache")
            termination = work / f"termination-{run_id}-{phase}"
            env = child_env(cache, {"KUBESLOTH_TERMINATION_LOG": str(termination), **row["env"]})
            resumed: dict = {}

            def on_line(line: str, seconds: float, resumed=resumed) -> None:
                m = RESUMING.search(line)
                if m and "at_s" not in resumed:
                    resumed.update(at_s=seconds, step=int(m[2]), path=m[1])
            timeout = min(deadline - time.time(), args.row_timeout)
            log(f"{name} {phase}: start, {deadline - time.time():.0f}s of budget left")
            raw = run_child(name, argv, env, work, out / f"{run_id}-{phase}.log", nvml, last_step=steps,
                            timeout=timeout, on_line=on_line,
                            interrupt_at=args.interrupt_at if phase == "interrupted" else None)
            first = min(raw["steps"]) if raw["steps"] else None
            record = {"exit_code": raw["exit_code"], "wall": raw["wall"], "first_step": first,
                      "first_step_s": raw["steps"][first][0] if first else None,
                      "losses": {k: v[1] for k, v in raw["steps"].items()},
                      "torch_reserved_peak": raw["torch_reserved_peak"], "nvml_peak": raw["nvml_peak"],
                      "termination": termination.read_text()[:600] if termination.is_file() else None}
            if phase == "interrupted":
                record["sigterm_at_s"] = raw["interrupted_at"]
                record["sigterm_to_exit_s"] = (raw["wall"] - raw["interrupted_at"]) if raw["interrupted_at"] else None
                record["checkpoint_bytes"] = dir_bytes(output / "checkpoints")
            else:
                record["resumed"] = resumed or None
            result[phase] = record
            log(f"{name} {phase}: exit {raw['exit_code']}, first step {first} at "
                f"{record['first_step_s'] or 0:.1f}s, wall {raw['wall']:.0f}s"
                + (f", SIGTERM -> exit {record['sigterm_to_exit_s'] or 0:.1f}s, checkpoint "
                   f"{record['checkpoint_bytes'] / 2**30:.1f} GiB" if phase == "interrupted" else
                   f", resumed {resumed}"))
        results.append(result)
        (out / "restart-table.json").write_text(json.dumps({"rows": results, "meta": {
            "command": sys.argv, "versions": versions()}}, indent=2, default=str))
        shutil.rmtree(output, ignore_errors=True)  # 30 GB a checkpoint: the disk holds one at a time
        if args.build_models and all(later["shape"] != row["shape"] for later in rows[index + 1:]):
            shutil.rmtree(model_dir, ignore_errors=True)
    nvml.stop()
    lines = ["| row | interrupted at step | SIGTERM -> exit s (interrupt checkpoint) | checkpoint GiB | exit | "
             "restart: spawn -> resuming s (step) | spawn -> first step s (step) | exit |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['row']} | skipped: {r['skipped']} | | | | | | |")
            continue
        a, b = r["interrupted"], r["restarted"]
        res = b.get("resumed") or {}
        lines.append(f"| {r['row']} | {r['interrupt_at']} | {a['sigterm_to_exit_s'] or 0:.1f} | "
                     f"{a['checkpoint_bytes'] / 2**30:.1f} | {a['exit_code']} | {res.get('at_s', 0):.1f} ({res.get('step')}) | "
                     f"{b['first_step_s'] or 0:.1f} ({b['first_step']}) | {b['exit_code']} |")
    table = "\n".join(lines) + "\n"
    (out / "restart-table.md").write_text(table)
    print(table, flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("models")
    p.add_argument("--out", required=True)
    p.add_argument("--shapes", default="8b,1b", help=f"comma-separated, of: {', '.join(SHAPES)}")
    p.add_argument("--seqs", default=str(SEQ), help="sequence lengths to write data-SEQ.jsonl for")
    p.add_argument("--rows", help="plan-table rows: build the shapes and data they name (overrides the above)")
    p.set_defaults(func=cmd_models)
    def plan_row_command(name: str, help: str, rows_help: str, row_timeout: float, min_row_seconds: float):
        """The arguments plan-table and restart share (both run plan rows through the trainer)."""
        p = sub.add_parser(name, help=help)
        p.add_argument("--models", required=True)
        p.add_argument("--rows", required=True, help=rows_help)
        p.add_argument("--out", required=True)
        p.add_argument("--work", default="/tmp/bench-work")
        p.add_argument("--cache", default="/tmp/bench-cache", help="persistent compile-cache path")
        p.add_argument("--budget", type=float, default=480, help="seconds for all rows")
        p.add_argument("--row-timeout", type=float, default=row_timeout, help="seconds one process may run at most")
        p.add_argument("--min-row-seconds", type=float, default=min_row_seconds,
                       help="skip a row with less budget left")
        return p

    p = plan_row_command("plan-table", "the memory planner's plans through the trainer, across shapes, sequence "
                         "lengths and budgets", "SHAPE:SEQ:BUDGET[:PROFILE],... e.g. 8b:16384:24,qwen7b:8192:48",
                         row_timeout=180, min_row_seconds=45)
    p.add_argument("--warmup", type=int, default=3, help="warm-up steps (not timed)")
    p.add_argument("--timed", type=int, default=5, help="timed steps after the warm-up")
    p.add_argument("--engine", help="KUBESLOTH_ENGINE for the trainer (default: the environment's, else auto)")
    p.set_defaults(func=cmd_plan_table)
    p = plan_row_command("restart", "a SIGTERMed run and its restart from the interrupt checkpoint, per plan row",
                         "plan rows, e.g. 8b:2048:48:lean", row_timeout=240, min_row_seconds=120)
    p.add_argument("--interrupt-at", type=int, default=2, help="SIGTERM after this step's line")
    p.add_argument("--after", type=int, default=3, help="maxSteps is --interrupt-at + this")
    p.add_argument("--evict-page-cache", action="store_true",
                   help="before the restart, drop the model's and the checkpoint's files from the page cache "
                        "(a pod restarted on another node reads both from storage)")
    p.add_argument("--build-models", action="store_true",
                   help="build each row's shape and data into --models just before the row, remove the shape "
                        "after its last row (rows of several 7-8B shapes on a small disk)")
    p.set_defaults(func=cmd_restart)
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
