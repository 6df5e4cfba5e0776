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
