"""Datasets through `datasets.load_dataset`: hub repos from an offline datasets cache (with config names), local
csv/jsonl/json/parquet files compressed or not, only the requested split's files, maxSamples, data warnings, and
s3:// against a real S3-compatible HTTP server (moto's) on 127.0.0.1."""

from __future__ import annotations

import bz2
import gzip
import json
from pathlib import Path

import pytest

from kubesloth.trainer.data import (DataStats, build_training_data, data_warnings, load_records, read_records)
from kubesloth.trainer.errors import BadConfig, SourceNotFound
from kubesloth.trainer.sources import resolve_dataset

from .s3 import s3, s3_server  # noqa: F401  (fixtures)

RECORDS = [{"instruction": f"Add {i}.", "input": str(i), "output": str(i + 1)} for i in range(10)]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def jsonl(records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def load(uri: str, split: str = "train", max_samples=None, **spec):
    from kubesloth.api.v1alpha1 import DatasetSpec
    return load_records(resolve_dataset(DatasetSpec(source=uri, split=split, **spec)), max_samples)


# --- local files ------------------------------------------------------------------------------------------------

def write_file(path: Path, kind: str, records=RECORDS) -> Path:
    if kind == "jsonl":
        path.write_text(jsonl(records))
    elif kind == "jsonl.gz":
        path.write_bytes(gzip.compress(jsonl(records).encode()))
    elif kind == "jsonl.bz2":
        path.write_bytes(bz2.compress(jsonl(records).encode()))
    elif kind == "jsonl.zst":
        import zstandard  # the trainer extra's (and the image's): never skipped

        path.write_bytes(zstandard.ZstdCompressor().compress(jsonl(records).encode()))
    elif kind == "jsonl.lz4":
        import lz4.frame

        path.write_bytes(lz4.frame.compress(jsonl(records).encode()))
    elif kind == "jsonl.xz":
        import lzma

        path.write_bytes(lzma.compress(jsonl(records).encode()))
    elif kind == "json":
        path.write_text(json.dumps(records))
    elif kind == "csv":
        keys = list(records[0])
        path.write_text(",".join(keys) + "\n" + "".join(",".join(str(r.get(k, "")) for k in keys) + "\n"
                                                       for r in records))
    elif kind == "csv.gz":
        keys = list(records[0])
        path.write_bytes(gzip.compress((",".join(keys) + "\n" + "".join(
            ",".join(str(r.get(k, "")) for k in keys) + "\n" for r in records)).encode()))
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(records), path)
    return path


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "jsonl.bz2", "jsonl.zst", "jsonl.lz4", "jsonl.xz", "json",
                                  "csv", "csv.gz", "parquet"])
def test_local_file_types(tmp_path, kind, monkeypatch):
    monkeypatch.setattr("datasets.config.HF_DATASETS_CACHE", str(tmp_path / "cache"))
    path = write_file(tmp_path / f"data.{kind}", kind)
    records = load(f"file://{path}")
    assert [str(r["output"]) for r in records] == [str(i + 1) for i in range(10)]
    assert [r["instruction"] for r in load(f"file://{path}", max_samples=3)] == ["Add 0.", "Add 1.", "Add 2."]


def test_json_object_and_csv_empty_cells(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setattr("datasets.config.HF_DATASETS_CACHE", str(tmp_path / "cache"))
    (tmp_path / "o.json").write_text(json.dumps({"data": RECORDS[:2]}))
    assert [r["output"] for r in load(f"file://{tmp_path / 'o.json'}")] == ["1", "2"]
    (tmp_path / "e.csv").write_text("instruction,input,output\nSay hi.,,hi\n")
    from kubesloth.trainer.data import render
    text = render(load(f"file://{tmp_path / 'e.csv'}")[0], 0, "alpaca", "text", tiny_tokenizer)
    assert "### Input" not in text and text.endswith("### Response:\nhi")  # the empty cell is no input


def test_a_directory_reads_only_the_split(tmp_path, monkeypatch):
    """The old bug: every file was read (a broken test file failed a train run; a stray dataset_infos.json could
    be read as data when no file named the split)."""
    monkeypatch.setattr("datasets.config.HF_DATASETS_CACHE", str(tmp_path / "cache"))
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    (repo / "data" / "train-00000-of-00001.jsonl").write_text(jsonl(RECORDS[:4]))
    (repo / "data" / "test-00000-of-00001.jsonl").write_text("NOT JSON\n")
    (repo / "dataset_infos.json").write_text(json.dumps({"default": {"description": "metadata, not data"}}))
    assert len(load(f"file://{repo}")) == 4
    with pytest.raises(BadConfig, match="test-00000-of-00001.jsonl|cannot be parsed"):
        load(f"file://{repo}", split="test")
    with pytest.raises(BadConfig, match="spec.dataset.split: 'validation' is not a split"):
        load(f"file://{repo}", split="validation")
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "data.jsonl").write_text(jsonl(RECORDS[:3]))
    (flat / "dataset_infos.json").write_text(json.dumps({"default": {"description": "x"}}))
    assert [r["instruction"] for r in load(f"file://{flat}")] == ["Add 0.", "Add 1.", "Add 2."]
    # dataDir: a sub-directory of the source.
    (flat / "more").mkdir()
    (flat / "more" / "train.parquet").write_bytes(write_file(tmp_path / "x.parquet", "parquet").read_bytes())
    assert len(load(f"file://{flat}", dataDir="more")) == 10


def test_broken_and_missing_sources(tmp_path, monkeypatch):
    monkeypatch.setattr("datasets.config.HF_DATASETS_CACHE", str(tmp_path / "cache"))
    (tmp_path / "bad.jsonl").write_text('{"instruction": "x"}\nnot json\n')
    with pytest.raises(BadConfig, match="spec.dataset.source: .*cannot be parsed"):
        load(f"file://{tmp_path / 'bad.jsonl'}")
    with pytest.raises(SourceNotFound):
        load(f"file://{tmp_path / 'absent'}")


def test_read_records_of_paths_keeps_the_old_interface(tmp_path, monkeypatch):
    monkeypatch.setattr("datasets.config.HF_DATASETS_CACHE", str(tmp_path / "cache"))
    a = write_file(tmp_path / "a.jsonl", "jsonl", RECORDS[:3])
    b = write_file(tmp_path / "b.parquet", "parquet", RECORDS[3:6])
    assert len(read_records([a, b])) == 6 and len(read_records([a, b], max_samples=4)) == 4


# --- the hub, offline -------------------------------------------------------------------------------------------

def build_hub_cache(cache: Path, repo: str, configs: dict[str, list[dict]]) -> None:
    """What `load_dataset("ORG/NAME", CONFIG)` leaves in HF_DATASETS_CACHE after an online run
    (ORG___NAME/CONFIG/0.0.0/COMMIT/*.arrow), made by datasets' own builder from local files (no hub)."""
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.json.json import Json, JsonConfig

    sources = {}
    for name, records in configs.items():
        path = cache.parent / f"src-{name}.jsonl"
        path.write_text(jsonl(records))
        sources[name] = str(path)

    class HubRepo(Json):
        BUILDER_CONFIGS = [JsonConfig(name=name, data_files=DataFilesDict.from_patterns(
            {"train": [path], "test": [path]})) for name, path in sources.items()]

    for name in configs:
        HubRepo(cache_dir=str(cache), dataset_name=repo.split("/")[1], repo_id=repo, config_name=name,
                hash=COMMIT).download_and_prepare()


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    cache = tmp_path / "datasets-cache"
    build_hub_cache(cache, "acme/tiny-alpaca", {"short": RECORDS[:3], "full": RECORDS})
    import datasets.config
    import huggingface_hub.constants
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_dataset_from_the_offline_cache_with_config_names(offline_hub):
    assert len(load("hf://acme/tiny-alpaca", config="short")) == 3
    assert len(load("hf://acme/tiny-alpaca", config="full")) == 10
    assert len(load("hf://acme/tiny-alpaca", config="full", max_samples=4)) == 4
    assert len(load("hf://acme/tiny-alpaca", split="test", config="short")) == 3
    with pytest.raises(BadConfig, match="spec.dataset.config: .*multiple"):
        load("hf://acme/tiny-alpaca")  # two configs cached: which one
    with pytest.raises(BadConfig, match="spec.dataset.split: .*validation"):
        load("hf://acme/tiny-alpaca", split="validation", config="short")
    with pytest.raises(SourceNotFound, match="not in the local datasets cache"):
        load("hf://acme/absent")


# --- data warnings ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_model)


def test_warnings_for_short_truncated_and_empty_rows(tiny_tokenizer):
    def build(records, fmt="text", seq=128):
        return build_training_data(None, records=records, fmt=fmt, text_field="text", max_samples=None,
                                   tokenizer=tiny_tokenizer, max_seq_length=seq, packing=False)

    ok = build([{"text": "The quick brown fox jumps over the lazy dog, again and again."}] * 4)
    assert ok.warnings == [] and ok.stats.median_tokens >= 8
    short = build([{"text": "a"}] * 4)  # BOS + a + EOS: the "2-token rows" run
    assert any("median example has" in w for w in short.warnings), short.warnings
    cut = build([{"text": "word " * 200}] * 3 + [{"text": "The quick brown fox jumps over the dog."}], seq=32)
    assert cut.stats.truncated == 3 and any("3 of 4 examples (75%)" in w and "truncated" in w
                                            for w in cut.warnings), cut.warnings
    empty = build([{"text": "   "}] * 3 + [{"text": "The quick brown fox jumps over the lazy dog."}])
    assert empty.stats.empty == 3 and any("empty" in w for w in empty.warnings), empty.warnings
    assert data_warnings(DataStats(records=10, examples=10, truncated=5, median_tokens=50), 128, "text") == []


# --- s3:// against a real S3-compatible server ------------------------------------------------------------------

# The server and the client: tests/trainer/s3.py (never skipped).


def test_s3_files_prefixes_splits_and_streaming(s3, tmp_path):
    fs, bucket = s3
    fs.put(str(write_file(tmp_path / "a.jsonl.gz", "jsonl.gz")), f"{bucket}/one/alpaca.jsonl.gz")
    fs.put(str(write_file(tmp_path / "tr.parquet", "parquet", RECORDS[:6])), f"{bucket}/repo/data/train-0.parquet")
    fs.put(str(write_file(tmp_path / "te.parquet", "parquet", RECORDS[6:])), f"{bucket}/repo/data/test-0.parquet")
    fs.put(str(write_file(tmp_path / "p.jsonl", "jsonl")), f"{bucket}/plain/train.jsonl")
    assert len(load(f"s3://{bucket}/one/alpaca.jsonl.gz")) == 10
    assert len(load(f"s3://{bucket}/one/alpaca.jsonl.gz", max_samples=2)) == 2  # compressed: read, then cut
    assert [r["output"] for r in load(f"s3://{bucket}/repo")] == [str(i + 1) for i in range(6)]
    assert [r["output"] for r in load(f"s3://{bucket}/repo", split="test")] == ["7", "8", "9", "10"]
    assert [r["output"] for r in load(f"s3://{bucket}/repo", dataDir="data", max_samples=2)] == ["1", "2"]
    assert [r["output"] for r in load(f"s3://{bucket}/plain", max_samples=3)] == ["1", "2", "3"]  # streamed
    with pytest.raises(BadConfig, match="spec.dataset.split: 'validation'"):
        load(f"s3://{bucket}/repo", split="validation")
    with pytest.raises(SourceNotFound, match="does not exist"):
        load(f"s3://{bucket}/absent.jsonl")
