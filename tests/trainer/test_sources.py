"""Source and destination URIs -> local paths (no network: hf:// from an offline local cache)."""

from __future__ import annotations

import shutil

import pytest

from kubesloth.trainer.errors import BadConfig, SourceNotFound
from kubesloth.trainer.sources import (SourceRef, data_builder, parse_uri, resolve_dataset, resolve_destination,
                                       resolve_model)


@pytest.mark.parametrize("uri,ref", [
    ("hf://meta-llama/Llama-3.1-8B", SourceRef("hf", "meta-llama/Llama-3.1-8B")),
    ("hf://gpt2@main", SourceRef("hf", "gpt2", "main")),
    ("hf://org/name@refs/pr/3", SourceRef("hf", "org/name", "refs/pr/3")),
    ("pvc://models/llama/8b/", SourceRef("pvc", "models/llama/8b")),
    ("file:///data/x.jsonl", SourceRef("file", "/data/x.jsonl")),
    ("s3://bucket/prefix", SourceRef("s3", "bucket/prefix")),
])
def test_parse_uri(uri, ref):
    assert parse_uri(uri, "f") == ref


@pytest.mark.parametrize("uri", ["http://x/y", "file://relative", "pvc:///abs", "hf://bad repo"])
def test_parse_uri_rejects(uri):
    with pytest.raises(BadConfig, match="spec.model.source"):
        parse_uri(uri, "spec.model.source")


def test_pvc_resolves_under_the_pvc_root(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("KUBESLOTH_PVC_ROOT", str(tmp_path))
    shutil.copytree(tiny_model, tmp_path / "models" / "tiny")
    assert resolve_model("pvc://models/tiny") == tmp_path / "models" / "tiny"
    assert resolve_destination("pvc://outputs/run-1") == tmp_path / "outputs" / "run-1"
    with pytest.raises(SourceNotFound, match="pvc://models/other"):
        resolve_model("pvc://models/other")


def test_destinations():
    assert str(resolve_destination("file:///out/x")) == "/out/x"
    with pytest.raises(BadConfig, match="s3:// destinations"):
        resolve_destination("s3://bucket/out")


def test_hf_model_from_an_offline_cache(tiny_model, tmp_path, monkeypatch):
    """The hub cache layout snapshot_download resolves offline: refs/<rev> -> snapshots/<commit>."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny"
    shutil.copytree(tiny_model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_model("hf://acme/tiny") == repo / "snapshots" / commit
    with pytest.raises(SourceNotFound, match="not in the local Hugging Face cache"):
        resolve_model("hf://acme/absent")


def test_dataset_sources(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl.gz").write_bytes(b"")
    (tmp_path / "README.md").write_text("")
    src = resolve_dataset(f"file://{tmp_path / 'data' / 'train.jsonl.gz'}", "train")
    assert (src.path, src.data_files, src.split) == ("json", [str(tmp_path / "data" / "train.jsonl.gz")], "train")
    assert resolve_dataset(f"file://{tmp_path}", "test").path == str(tmp_path)  # a directory: datasets infers
    assert data_builder("x.CSV") == "csv" and data_builder("a.parquet") == "parquet" and data_builder("b.txt") is None
    with pytest.raises(BadConfig, match="allowed: .jsonl"):
        resolve_dataset(f"file://{tmp_path / 'README.md'}", "train")
    with pytest.raises(SourceNotFound, match="not found"):
        resolve_dataset(f"file://{tmp_path / 'absent.jsonl'}", "train")
