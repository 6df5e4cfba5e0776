"""Model, dataset and destination URIs -> local paths (models, destinations) or what datasets.load_dataset reads.

Models: hf://ORG/NAME[@rev] is downloaded with huggingface_hub (token from $HF_TOKEN; HF_HUB_OFFLINE is honoured),
pvc://CLAIM/path is $KUBESLOTH_PVC_ROOT/CLAIM/path, file:///path is /path, s3://bucket/prefix is copied through
fsspec/s3fs (the optional `s3` extra) into a local cache. Datasets: a DatasetSource for datasets.load_dataset
(trainer.data.load_records): the hub through datasets' own hub client (only the split's files), local files and
directories, s3:// through fsspec.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from kubesloth.api.contract import PVC_ROOT, Env
from kubesloth.trainer.errors import BadConfig, SourceNotFound

# What a hub download fetches: the HF-format files only (e.g. not a Llama repo's 16 GB original/*.pth).
HF_MODEL_FILES = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]
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
                                 allow_patterns=HF_MODEL_FILES)
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


# --- datasets -------------------------------------------------------------------------------------------------
# Everything a dataset source can be is read by `datasets.load_dataset`: a hub repo (the split's files only), a
# local/PVC file or directory, an s3:// file or prefix through fsspec (s3fs). These are the file types a single file
# may have (a directory's files are inferred by datasets itself); any of them compressed as datasets reads them.
DATA_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".lz4")
DATA_EXTENSIONS = tuple(DATA_BUILDERS)


def data_builder(name: str) -> Optional[str]:
    """The datasets builder of a file name (json, parquet, csv), compression suffixes ignored; None if unknown."""
    stem = name.lower()
    for suffix in COMPRESSIONS:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return next((builder for ext, builder in DATA_BUILDERS.items() if stem.endswith(ext)), None)


def is_compressed(name: str) -> bool:
    return name.lower().endswith(COMPRESSIONS)


@dataclass
class DatasetSource:
    """What `datasets.load_dataset` gets for spec.dataset: `path` is a hub repo id, a local directory or a builder
    name (json, parquet, csv) with `data_files` (local paths or s3:// URLs)."""

    uri: str
    scheme: str
    path: str
    split: str = "train"
    config: Optional[str] = None
    data_dir: Optional[str] = None
    data_files: Optional[list[str]] = None
    revision: Optional[str] = None
    builder_kwargs: dict = field(default_factory=dict)
    # Set by trainer.data.load_records (before torch is imported): what the engines then render and tokenize.
    records: Optional[list] = field(default=None, repr=False, compare=False)
    records_limit: Optional[int] = field(default=None, repr=False, compare=False)

    @property
    def remote(self) -> bool:
        return self.scheme in ("hf", "s3")

    def __str__(self) -> str:
        extra = [f"split {self.split}"]
        if self.config:
            extra.append(f"config {self.config}")
        if self.data_dir:
            extra.append(f"dataDir {self.data_dir}")
        return f"{self.uri} ({', '.join(extra)})"


def _s3_files(ref: SourceRef, split: str, field_name: str) -> tuple[str, list[str], dict]:
    """An s3:// file or prefix -> (builder, the split's files, builder kwargs), with datasets' own rules for
    which files of a prefix belong to a split (the ones a hub repo would use)."""
    try:
        import s3fs
    except ImportError:
        raise SourceNotFound(f"{field_name}: s3:// needs the optional extra kubesloth[s3] (s3fs), which is not "
                             f"installed in this image") from None
    url = f"s3://{ref.location}"
    fs = s3fs.S3FileSystem()
    try:
        if not fs.exists(ref.location):
            raise SourceNotFound(f"{field_name}: {url} does not exist")
        is_dir = fs.isdir(ref.location)
    except SourceNotFound:
        raise
    except (OSError, PermissionError) as exc:
        raise SourceNotFound(f"{field_name}: {url} could not be read: {type(exc).__name__}: {exc}") from None
    if not is_dir:
        builder = data_builder(ref.location)
        if builder is None:
            raise BadConfig(f"{field_name}: {url} is not a {', '.join(DATA_EXTENSIONS)} file (optionally "
                            f"{', '.join(COMPRESSIONS)}-compressed)")
        return builder, [url], {}
    from datasets.data_files import DataFilesDict, EmptyDatasetError, get_data_patterns
    from datasets.download import DownloadConfig
    from datasets.exceptions import DataFilesNotFoundError
    from datasets.load import infer_module_for_data_files

    config = DownloadConfig()
    try:
        patterns = get_data_patterns(url, download_config=config)
        files = DataFilesDict.from_patterns(patterns, base_path=url, download_config=config)
        builder, kwargs = infer_module_for_data_files(files, download_config=config)
    except (EmptyDatasetError, DataFilesNotFoundError, FileNotFoundError) as exc:
        raise SourceNotFound(f"{field_name}: {url} holds no data files datasets can read ({exc})") from None
    if split not in files:
        raise BadConfig(f"spec.dataset.split: {split!r} is not a split of {url} (it has: "
                        f"{', '.join(map(str, files))})")
    if builder not in DATA_BUILDERS.values():
        raise BadConfig(f"{field_name}: {url} holds {builder} files; allowed: {', '.join(DATA_EXTENSIONS)}")
    return builder, list(files[split]), kwargs


def _json_field(path: Path) -> Optional[str]:
    """A .json file holding an object ({"train": [...]} or {"data": [...]}): the key of its list of records."""
    try:
        with path.open("rb") as handle:
            head = handle.read(4096).lstrip()
        if not head.startswith(b"{"):
            return None
        import json

        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # datasets reports the parse error with its own message
    return next((key for key, value in doc.items() if isinstance(value, list)), None) if isinstance(doc, dict) \
        else None


def resolve_dataset(dataset, split: Optional[str] = None) -> DatasetSource:
    """spec.dataset (or a URI and a split) -> what load_dataset reads. Local paths must exist; hub and s3 sources
    are checked when they are loaded (trainer.data.load_records, still before torch)."""
    field_name = "spec.dataset.source"
    if isinstance(dataset, str):
        uri, config, data_dir = dataset, None, None
        split = split or "train"
    else:
        uri, config, data_dir = dataset.source, dataset.config, dataset.data_dir
        split = split or dataset.split
    ref = parse_uri(uri, field_name)
    if ref.scheme == "hf":
        return DatasetSource(uri, "hf", ref.location, split, config, data_dir, revision=ref.revision)
    if ref.scheme == "s3":
        if config:
            raise BadConfig("spec.dataset.config: config names are for hf:// datasets (and local dataset repos "
                            "with configs in their README); an s3:// source has none")
        location = ref.location + (f"/{data_dir.strip('/')}" if data_dir else "")
        builder, files, kwargs = _s3_files(SourceRef("s3", location), split, field_name)
        return DatasetSource(uri, "s3", builder, split, data_files=files, builder_kwargs=kwargs)
    path = local_path(ref)
    if not path.exists():
        raise SourceNotFound(f"{field_name}: {uri} not found (looked at {path})")
    if path.is_dir():
        if data_dir and not (path / data_dir).is_dir():
            raise SourceNotFound(f"spec.dataset.dataDir: {data_dir!r} is not a directory of {uri}")
        return DatasetSource(uri, ref.scheme, str(path), split, config, data_dir)
    builder = data_builder(path.name)
    if builder is None:
        raise BadConfig(f"{field_name}: {uri} is a {path.suffix or 'extensionless'} file; allowed: "
                        + ", ".join(DATA_EXTENSIONS) + f" (optionally {', '.join(COMPRESSIONS)}-compressed)")
    if config or data_dir:
        raise BadConfig("spec.dataset.config/dataDir: a single file has no configs or data directories")
    kwargs = {}
    if path.suffix == ".json" and (key := _json_field(path)):
        kwargs["field"] = key
    return DatasetSource(uri, ref.scheme, builder, split, data_files=[str(path)], builder_kwargs=kwargs)


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
