"""The destination: checked writable before training, the final model saved and verified by reading it back,
and summary.json. Shared by every engine."""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from kubesloth.api.contract import FINAL_MODEL_DIR, SUMMARY_FILE
from kubesloth.trainer.errors import OutputUnwritable, TrainerFailure

OUTPUT_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.ENOTDIR}


def output_error(exc: OSError, destination: Path, doing: str) -> OutputUnwritable:
    what = {errno.ENOSPC: "disk full", errno.EDQUOT: "quota exceeded", errno.EROFS: "read-only file system",
            errno.EACCES: "permission denied", errno.EPERM: "permission denied",
            errno.ENOTDIR: "a path component is a file"}.get(exc.errno, exc.strerror or str(exc))
    return OutputUnwritable(f"spec.output.destination: cannot {doing} under {destination}: {what}")


def is_output_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in OUTPUT_ERRNOS


def check_writable(destination: Path, need_bytes: int = 0) -> None:
    """Create the destination, write, fsync and delete a probe file, and check the free space; before any
    heavy work so a bad destination fails in seconds, not after hours of training."""
    try:
        destination.mkdir(parents=True, exist_ok=True)
        probe = destination / f".write-probe-{uuid.uuid4().hex[:8]}"
        with probe.open("wb") as handle:
            handle.write(b"kubesloth")
            handle.flush()
            os.fsync(handle.fileno())
        probe.unlink()
    except OSError as exc:
        raise output_error(exc, destination, "write") from None
    free = shutil.disk_usage(destination).free
    if need_bytes and free < need_bytes:
        raise OutputUnwritable(f"spec.output.destination: {destination} has {free / 2**30:.2f} GiB free; the "
                               f"model alone needs {need_bytes / 2**30:.2f} GiB")


def weights_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) or sum(
        p.stat().st_size for p in model_dir.glob("*.bin"))


@dataclass
class SavedModel:
    path: Path
    files: int
    bytes: int
    tensors_checked: int
    max_logit_diff: Optional[float]


def _compare_tensors(model: Any, model_dir: Path) -> int:
    """Every saved tensor equals the model's, and every parameter of the model was saved."""
    import torch
    from safetensors import safe_open

    state = {name: tensor for name, tensor in model.state_dict().items()}
    params = {name for name, _ in model.named_parameters()}
    seen: set[str] = set()
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise TrainerFailure(f"save check failed: no safetensors file in {model_dir}")
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                if name not in state:
                    continue
                saved = handle.get_tensor(name)
                live = state[name].detach().to("cpu")
                if saved.shape != live.shape or not torch.equal(saved, live.to(saved.dtype)):
                    raise TrainerFailure(f"save check failed: tensor {name} in {file.name} differs from the "
                                         f"trained model")
                seen.add(name)
    missing = params - seen
    if missing:
        raise TrainerFailure(f"save check failed: {len(missing)} parameters missing from {model_dir}, e.g. "
                             f"{sorted(missing)[0]}")
    return len(seen)


def _compare_logits(model: Any, model_dir: Path, probe_ids: list[int]) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(model_dir, dtype=model.dtype, local_files_only=True)
    reloaded.eval()
    was_training = model.training
    model.eval()
    batch = torch.tensor([probe_ids], device=model.device)
    with torch.no_grad():
        ours = model(input_ids=batch, use_cache=False).logits.float().cpu()
        theirs = reloaded(input_ids=batch.cpu(), use_cache=False).logits.float()
    model.train(was_training)
    diff = (ours - theirs).abs().max().item()
    if diff > 1e-4:
        raise TrainerFailure(f"save check failed: the reloaded model's logits differ by {diff:.3g}")
    return diff


def save_final_model(model: Any, tokenizer: Any, destination: Path, *, probe_ids: Optional[list[int]],
                     check_logits: bool) -> SavedModel:
    """Write <destination>/model.tmp, verify it from disk, then rename it to <destination>/model: a `model`
    dir exists only when it was read back equal to the trained weights."""
    final = destination / FINAL_MODEL_DIR
    staging = destination / f"{FINAL_MODEL_DIR}.tmp"
    try:
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        checked = _compare_tensors(model, staging)
        diff = _compare_logits(model, staging, probe_ids) if check_logits and probe_ids else None
        shutil.rmtree(final, ignore_errors=True)
        os.rename(staging, final)
    except OSError as exc:
        if is_output_error(exc):
            raise output_error(exc, destination, "save the model") from None
        raise
    files = [p for p in final.rglob("*") if p.is_file()]
    return SavedModel(final, len(files), sum(p.stat().st_size for p in files), checked, diff)


def write_summary(destination: Path, summary: dict[str, Any]) -> Path:
    path = destination / SUMMARY_FILE
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        raise output_error(exc, destination, "write summary.json") from None
    return path


# --- results: the model card and the optional hub push ----------------------------------------------------------
MODEL_CARD_FILE = "README.md"
GPU_HOURLY_PRICE_ENV = "KUBESLOTH_GPU_HOURLY_PRICE"  # $/hour, when the environment knows it: the card's cost line


def _hub_id(uri: str) -> Optional[str]:
    if uri.startswith("hf://"):
        return uri[len("hf://"):].split("@", 1)[0]
    return None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "-" if value is None else str(value)


def model_card_text(job: Any, summary: dict[str, Any]) -> Any:
    """A huggingface_hub.ModelCard for the saved model: base model, data, hyperparameters, the plan, final loss,
    tokens, time and cost where known."""
    from huggingface_hub import ModelCard, ModelCardData

    spec = job.spec
    meta = job.metadata or {}
    base, data = _hub_id(spec.model.source), _hub_id(spec.dataset.source)
    card_data = ModelCardData(
        base_model=base, datasets=[data] if data else None, library_name="transformers",
        pipeline_tag="text-generation", tags=["kubesloth", "full-fine-tuning", f"format-{spec.dataset.format}"])
    hours = (summary.get("train_seconds") or 0) / 3600
    price = os.environ.get(GPU_HOURLY_PRICE_ENV)
    try:
        cost = f"${float(price) * hours:.4f} ({float(price):g} $/GPU-hour x {hours:.3f} h of training)" \
            if price else "unknown to the trainer (the operator's status.cost has it where a price table is set)"
    except ValueError:
        cost = "unknown"
    dataset = [f"source `{spec.dataset.source}`", f"split `{spec.dataset.split}`", f"format `{spec.dataset.format}`"]
    if spec.dataset.config:
        dataset.append(f"config `{spec.dataset.config}`")
    if spec.dataset.data_dir:
        dataset.append(f"dataDir `{spec.dataset.data_dir}`")
    if spec.dataset.max_samples:
        dataset.append(f"first {spec.dataset.max_samples} records")
    stats = summary.get("data") or {}
    lines = [
        f"# {meta.get('name') or 'kubesloth fine-tune'}", "",
        f"Full fine-tuning (every weight trained) of `{spec.model.source}` by kubesloth "
        f"(FineTuneJob {meta.get('namespace', '-')}/{meta.get('name', '-')}), engine `{summary.get('engine')}`, "
        f"profile `{summary.get('profile')}`.", "",
        "## Data", "", "- " + ", ".join(dataset),
        f"- {stats.get('records', '-')} records, {stats.get('examples', '-')} examples trained "
        f"({stats.get('truncated', '-')} truncated to maxSeqLength {spec.model.max_seq_length}, "
        f"{stats.get('empty', '-')} empty), median {_fmt(stats.get('median_tokens'))} tokens; packing "
        f"{spec.dataset.packing}",
    ]
    for warning in summary.get("data_warnings") or []:
        lines.append(f"- **warning**: {warning}")
    lines += ["", "## Results", "", "| | |", "|---|---|",
              f"| final loss | {_fmt(summary.get('final_loss'))} |",
              f"| steps | {summary.get('steps')} of {summary.get('planned_steps')} (epoch {_fmt(summary.get('epoch'))}) |",
              f"| tokens trained | {summary.get('tokens')} |",
              f"| training time | {_fmt(summary.get('train_seconds'))} s (wall {_fmt(summary.get('wall_seconds'))} s) |",
              f"| tokens/s | {_fmt(summary.get('steady_tokens_per_second') or summary.get('tokens_per_second'))} |",
              f"| cost | {cost} |",
              f"| finished | {summary.get('finished_at')} |",
              "", "## Hyperparameters", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {_fmt(value)} |" for key, value in sorted((summary.get("hyperparameters") or {}).items())]
    plan = summary.get("plan")
    lines += ["", "## Memory plan", ""]
    if plan:
        lines += ["```json", json.dumps(plan, indent=2, sort_keys=True, default=str), "```"]
    else:
        lines.append("No plan (a shape the planner does not model).")
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
    return card


def write_model_card(model_dir: Path, job: Any, summary: dict[str, Any]) -> Path:
    """<model>/README.md beside the weights, written atomically and read back (its metadata must parse and name
    the base model)."""
    from huggingface_hub import ModelCard

    card = model_card_text(job, summary)
    path = model_dir / MODEL_CARD_FILE
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(str(card))
        os.replace(tmp, path)
    except OSError as exc:
        raise output_error(exc, model_dir, "write the model card") from None
    loaded = ModelCard.load(path)
    expected = _hub_id(job.spec.model.source)
    if loaded.data.base_model != expected or "## Results" not in loaded.text:
        raise TrainerFailure(f"model card check failed: {path} does not read back (base_model "
                             f"{loaded.data.base_model!r}, expected {expected!r})")
    return path


def hub_push_token() -> Optional[str]:
    from kubesloth.api.v1alpha1 import HUB_PUSH_TOKEN_ENV

    return os.environ.get(HUB_PUSH_TOKEN_ENV) or os.environ.get("HF_TOKEN") or None


def check_results_config(spec: Any) -> None:
    """At config time (before torch): trackers installed, a push token present."""
    from kubesloth.api.v1alpha1 import HUB_PUSH_TOKEN_ENV
    from kubesloth.trainer.callbacks import check_trackers
    from kubesloth.trainer.errors import BadConfig

    check_trackers(spec.training.report_to)
    if spec.output.push_to_hub is not None and not hub_push_token():
        raise BadConfig(f"spec.output.pushToHub: no token: ${HUB_PUSH_TOKEN_ENV} (from "
                        f"pushToHub.tokenSecretRef) is not set")


def push_to_hub(model_dir: Path, push: Any, log: Any = print, endpoint: Optional[str] = None) -> dict[str, Any]:
    """Upload the verified model directory (weights, tokenizer, README.md) to push.repository with
    HfApi.upload_folder: one commit, created private unless the repo exists. Returns what summary.json records."""
    from huggingface_hub import HfApi

    token = hub_push_token()
    api = HfApi(endpoint=endpoint, token=token)
    try:
        repo = api.create_repo(push.repository, repo_type="model", private=push.private, exist_ok=True)
        commit = api.upload_folder(repo_id=push.repository, repo_type="model", folder_path=str(model_dir),
                                   commit_message="kubesloth: fine-tuned model")
    except Exception as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if token:
            message = message.replace(token, "***")
        raise OutputUnwritable(f"spec.output.pushToHub: uploading {model_dir} to {push.repository} failed: "
                               f"{type(exc).__name__}: {message[:300]} (the verified model stays in {model_dir})"
                               ) from None
    url = getattr(commit, "commit_url", None) or str(commit)
    log(f"pushed {model_dir} to the hub: {push.repository} ({url})")
    return {"repository": push.repository, "url": str(getattr(repo, "url", "")), "commit": url,
            "private": push.private}
