"""Model, dataset and destination URIs -> local paths.

hf://ORG/NAME[@rev] is downloaded with huggingface_hub (token from $HF_TOKEN; HF_HUB_OFFLINE is honoured),
pvc://CLAIM/path is $KUBESLOTH_PVC_ROOT/CLAIM/path, file:///path is /path, s3://bucket/prefix is copied through
fsspec/s3fs (the optional `s3` extra) into a local cache.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from kubesloth.api.contract import PVC_ROOT, Env
from kubesloth.trainer.errors import BadConfig, SourceNotFound

DATA_EXTENSIONS = (".jsonl", ".json", ".parquet")
# What a hub download fetches: the HF-format files only (e.g. not a Llama repo's 16 GB original/*.pth).
HF_MODEL_FILES = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]
HF_DATASET_FILES = [f"*{ext}" for ext in DATA_EXTENSIONS]
_HF = re.compile(r"^hf://(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9._-]+)?)(@(?P<rev>[A-Za-z0-9._/-]+))?$")


@dataclass(frozen=True)
class SourceRef:
    scheme: str  # hf | pvc | file | s3
    location: str  # repo id, claim/path, absolute path or bucket/prefix
    revision: Optional[str] = None


def parse_uri(uri: str, field: str) -> SourceRef:
    if uri.startswith("hf://"):
        match = _HF.match(uri)
        if not match:
            raise BadConfig(f"{field}: {uri!r} is not hf://ORG/NAME[@revision]")
        return SourceRef("hf", match["repo"], match["rev"])
    if uri.startswith("pvc://"):
        rest = uri[len("pvc://"):]
        if not rest or rest.startswith("/"):
            raise BadConfig(f"{field}: {uri!r} is not pvc://CLAIM/path")
        return SourceRef("pvc", rest.rstrip("/"))
    if uri.startswith("file://"):
        path = uri[len("file://"):]
        if not path.startswith("/"):
            raise BadConfig(f"{field}: {uri!r} is not file:///absolute/path")
        return SourceRef("file", path)
    if uri.startswith("s3://"):
        return SourceRef("s3", uri[len("s3://"):].rstrip("/"))
    raise BadConfig(f"{field}: {uri!r} has an unknown scheme (allowed: hf://, pvc://, file://, s3://)")


def pvc_root() -> Path:
    return Path(os.environ.get(Env.PVC_ROOT.value) or PVC_ROOT)


def local_path(ref: SourceRef) -> Path:
    """The local path of a pvc:// or file:// reference."""
    if ref.scheme == "pvc":
        return pvc_root() / ref.location
    if ref.scheme == "file":
        return Path(ref.location)
    raise ValueError(f"{ref.scheme}:// has no local path")


def _hf_download(ref: SourceRef, repo_type: str, field: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                            RevisionNotFoundError)
    except ImportError:  # pragma: no cover - the trainer extra always has it
        raise SourceNotFound(f"{field}: hf:// needs huggingface_hub, which is not installed") from None
    token = os.environ.get(Env.HF_TOKEN.value) or None
    what = f"{field}: hf://{ref.location}" + (f"@{ref.revision}" if ref.revision else "")
    try:
        path = snapshot_download(repo_id=ref.location, repo_type=repo_type, revision=ref.revision, token=token,
                                 allow_patterns=HF_MODEL_FILES if repo_type == "model" else HF_DATASET_FILES)
    except GatedRepoError:
        raise SourceNotFound(f"{what} is gated: the token (model.tokenSecretRef) is missing or has no access"
                             ) from None
    except RepositoryNotFoundError:
        raise SourceNotFound(f"{what} does not exist on the hub (or is private and the token has no access)"
                             ) from None
    except RevisionNotFoundError:
        raise SourceNotFound(f"{what}: revision {ref.revision!r} does not exist") from None
    except LocalEntryNotFoundError:
        raise SourceNotFound(f"{what} is not in the local Hugging Face cache and the hub cannot be reached "
                             f"(offline: HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '')!r})") from None
    except OSError as exc:
        raise SourceNotFound(f"{what} could not be downloaded: {type(exc).__name__}") from None
    return Path(path)


def _s3_download(ref: SourceRef, field: str) -> Path:
    try:
        import s3fs
    except ImportError:
        raise SourceNotFound(f"{field}: s3:// needs the optional extra kubesloth[s3] (s3fs), which is not "
                             f"installed in this image") from None
    fs = s3fs.S3FileSystem()
    cache = Path(os.environ.get("KUBESLOTH_CACHE_DIR", "/tmp/kubesloth-cache")) / "s3" / ref.location
    try:
        if not fs.exists(ref.location):
            raise SourceNotFound(f"{field}: s3://{ref.location} does not exist")
        if fs.isdir(ref.location):
            fs.get(ref.location + "/", str(cache) + "/", recursive=True)
            return cache
        cache.parent.mkdir(parents=True, exist_ok=True)
        fs.get(ref.location, str(cache))
        return cache
    except SourceNotFound:
        raise
    except (OSError, PermissionError) as exc:
        raise SourceNotFound(f"{field}: s3://{ref.location} could not be read: {type(exc).__name__}: {exc}"
                             ) from None


def _fetch(uri: str, kind: str, field: str) -> Path:
    """The local path of a source: downloaded (hf://, s3://) or mapped (pvc://, file://); it must exist."""
    ref = parse_uri(uri, field)
    if ref.scheme == "hf":
        path = _hf_download(ref, kind, field)
    else:
        path = _s3_download(ref, field) if ref.scheme == "s3" else local_path(ref)
    if not path.exists():
        raise SourceNotFound(f"{field}: {uri} not found (looked at {path})")
    return path


def resolve_model(uri: str) -> Path:
    """A local directory with config.json (and weights, tokenizer)."""
    field = "spec.model.source"
    path = _fetch(uri, "model", field)
    if not (path / "config.json").is_file():
        raise SourceNotFound(f"{field}: {uri} ({path}) is not a model directory: it has no config.json")
    return path


def dataset_files(path: Path, split: str) -> list[Path]:
    """The data files of a dataset path: the file itself, or the directory's .jsonl/.json/.parquet files
    (those whose name mentions the split when any do, e.g. data/train-00000-of-00001.parquet)."""
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(DATA_EXTENSIONS)
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    for_split = [p for p in files if re.search(rf"(^|[^A-Za-z]){re.escape(split)}([^A-Za-z]|$)",
                                                  str(p.relative_to(path)))]
    return for_split or files


def resolve_dataset(uri: str, split: str) -> list[Path]:
    field = "spec.dataset.source"
    path = _fetch(uri, "dataset", field)
    if path.is_file() and not path.name.endswith(DATA_EXTENSIONS):
        raise BadConfig(f"{field}: {uri} is a {path.suffix or 'extensionless'} file; allowed: "
                        + ", ".join(DATA_EXTENSIONS))
    files = dataset_files(path, split)
    if not files:
        raise SourceNotFound(f"{field}: {uri} ({path}) holds no {', '.join(DATA_EXTENSIONS)} files")
    return files


def resolve_destination(uri: str) -> Path:
    """The local directory checkpoints and the model are written to."""
    field = "spec.output.destination"
    ref = parse_uri(uri, field)
    if ref.scheme == "hf":
        raise BadConfig(f"{field}: hf:// is not a destination (allowed: pvc://, file://)")
    if ref.scheme == "s3":
        # Checkpoint atomicity relies on rename, which object stores lack: write to a pvc:// volume instead.
        raise BadConfig(f"{field}: s3:// destinations are not supported by this trainer version "
                        f"(allowed: pvc://, file://)")
    return local_path(ref)
