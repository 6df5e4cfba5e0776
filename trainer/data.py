"""Dataset loading, formatting and tokenization, shared by every engine (HF Trainer based or a manual loop).

Records come from datasets.load_dataset (a hub repo, local/PVC files or directories of json/jsonl/parquet/csv,
compressed or not, s3:// through fsspec); each is rendered to text by its format (alpaca, chat, text),
tokenized, truncated to maxSeqLength, and optionally packed. Rows mostly truncated, empty or nearly token-free are
warned about (DataStats, data_warnings). The loss is on all tokens of an example (prompt
included) for every format: simple, and what the classic alpaca recipes did.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from kubesloth.api.contract import Env
from kubesloth.trainer.errors import BadConfig, SourceNotFound, TrainerFailure
from kubesloth.trainer.sources import is_compressed

IGNORE_INDEX = -100

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n{output}"
)


def _quiet_datasets() -> None:
    from datasets.utils import logging as ds_logging
    ds_logging.disable_progress_bar()
    ds_logging.set_verbosity_error()


def _load_error(source: Any, exc: BaseException) -> TrainerFailure:
    """A datasets/hub exception -> our exit code and a message naming the field."""
    from datasets.exceptions import DataFilesNotFoundError, DatasetGenerationError, DatasetNotFoundError

    what = f"spec.dataset.source: {source.uri}"
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, DatasetGenerationError):
        cause = exc.__cause__ or exc.__context__
        detail = f"{type(cause).__name__}: {str(cause).splitlines()[0][:300]}" if cause else text
        return BadConfig(f"{what} cannot be parsed: {detail}")
    if isinstance(exc, (DatasetNotFoundError, DataFilesNotFoundError, FileNotFoundError)):
        return SourceNotFound(f"{what} not found: {text[:400]}")
    if isinstance(exc, ConnectionError):
        offline = os.environ.get("HF_HUB_OFFLINE", "") or os.environ.get("HF_DATASETS_OFFLINE", "")
        return SourceNotFound(f"{what} is not in the local datasets cache and the hub cannot be reached "
                              f"(offline: HF_HUB_OFFLINE={offline!r}): {text[:300]}")
    if isinstance(exc, ValueError) and ("split" in text.lower() or "config" in text.lower()):
        field_name = "spec.dataset.split" if "split" in text.lower() else "spec.dataset.config"
        return BadConfig(f"{field_name}: {text[:400]} (source {source.uri})")
    if isinstance(exc, OSError):
        return SourceNotFound(f"{what} cannot be read: {type(exc).__name__}: {text[:300]}")
    return BadConfig(f"{what} cannot be loaded: {type(exc).__name__}: {text[:300]}")


def _split_files(source: Any, common: dict) -> Optional[dict]:
    """Only the requested split's data files (load_dataset alone prepares every split: a broken test file failed a
    train run, and a hub repo was downloaded whole). None where datasets reads no files (its offline cache)."""
    from datasets import load_dataset_builder

    builder = load_dataset_builder(source.path, **common)
    files = builder.config.data_files
    if not files:
        return None
    if source.split not in files:
        raise BadConfig(f"spec.dataset.split: {source.split!r} is not a split of {source.uri} (it has: "
                        f"{', '.join(map(str, files))})")
    # Relative to where load_dataset resolves them (the hub's hf://datasets/ORG/NAME@commit, a local directory;
    # below dataDir when set).
    base = (builder.base_path or "").rstrip("/")
    bases = ([f"{base}/{source.data_dir.strip('/')}"] if source.data_dir and base else []) + ([base] if base else [])

    def relative(name: str) -> str:
        for prefix in bases:
            if name.startswith(prefix + "/"):
                return name[len(prefix) + 1:]
        return name

    return {source.split: [relative(f) for f in files[source.split]]}


@contextmanager
def _hub_offline_only(datasets: Any, source: Any) -> Iterator[None]:
    """HF_HUB_OFFLINE=1 (an air-gapped cluster's trainer pods) means no Hugging Face Hub; datasets applies it to
    every remote URL and refused s3:// data files ("Offline mode is enabled. Tried to reach s3://..."). An s3://
    source is read with it off for the load (and no download counting, which would call the hub)."""
    if source.scheme != "s3" or not datasets.config.HF_HUB_OFFLINE:
        yield
        return
    saved = datasets.config.HF_HUB_OFFLINE, datasets.config.HF_UPDATE_DOWNLOAD_COUNTS
    datasets.config.HF_HUB_OFFLINE, datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False, False
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = saved


def load_records(source: Any, max_samples: Optional[int] = None) -> list[dict[str, Any]]:
    """The records of a dataset source (sources.DatasetSource) through datasets.load_dataset. With maxSamples, a
    remote source (hf://, s3://) is streamed and only the first N records are read."""
    if source.records is not None and source.records_limit == max_samples:
        return source.records
    import datasets

    _quiet_datasets()
    token = os.environ.get(Env.HF_TOKEN.value) or None
    common: dict[str, Any] = {}
    if source.scheme == "hf":
        common.update(token=token, revision=source.revision)
    if source.config:
        common["name"] = source.config
    if source.data_dir:
        common["data_dir"] = source.data_dir
    try:
        if source.data_files is not None:  # a builder name and its files
            common.update(data_files={source.split: list(source.data_files)}, **source.builder_kwargs)
        else:
            files = _split_files(source, common)
            if files is not None:
                common["data_files"] = files
        compressed = any(is_compressed(str(f)) for f in (common.get("data_files") or {}).get(source.split, []))
        offline = bool(datasets.config.HF_HUB_OFFLINE) and source.scheme != "s3"
        # datasets cannot stream compressed files from s3 (it hands s3fs aiohttp's client options).
        stream = bool(max_samples) and source.remote and not offline and not (compressed and source.scheme == "s3")
        with _hub_offline_only(datasets, source):  # a stream reads while it is iterated
            loaded = datasets.load_dataset(source.path, split=source.split, streaming=stream, **common)
            if stream:
                records = list(loaded.take(max_samples))
            else:
                if max_samples:
                    loaded = loaded.select(range(min(max_samples, len(loaded))))
                records = list(loaded)
    except TrainerFailure:
        raise
    except Exception as exc:  # datasets' and the hub's errors, fsspec's, pyarrow's
        raise _load_error(source, exc) from None
    if not records:
        raise BadConfig("spec.dataset.source: the dataset has no records")
    source.records, source.records_limit = records, max_samples
    return records


def read_records(files: Any, max_samples: Optional[int] = None) -> list[dict[str, Any]]:
    """Records of local files (a list of paths, read as one split) or of a DatasetSource."""
    from kubesloth.trainer.sources import resolve_dataset

    if not isinstance(files, (list, tuple)):
        return load_records(files, max_samples)
    records: list[dict[str, Any]] = []
    for path in files:
        records += load_records(resolve_dataset(f"file://{Path(path).resolve()}"),
                                max_samples - len(records) if max_samples else None)
        if max_samples and len(records) >= max_samples:
            break
    return records


def _missing(value: Any) -> bool:
    """None, or the NaN a CSV's empty cell becomes."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _need(record: dict, index: int, key: str, fmt: str, needs: str) -> Any:
    if not isinstance(record, dict) or _missing(record.get(key)):
        raise BadConfig(f"spec.dataset.format: record {index} has no field {key!r} (format {fmt} needs {needs})")
    return record[key]


def render(record: dict, index: int, fmt: str, text_field: str, tokenizer: Any) -> str:
    """One record as training text (special tokens added later, except what a chat template writes)."""
    if fmt == "alpaca":
        needs = "instruction, output; input optional"
        instruction = _need(record, index, "instruction", fmt, needs)
        output = _need(record, index, "output", fmt, needs)
        extra = "" if _missing(record.get("input")) else record.get("input")
        template = ALPACA_WITH_INPUT if extra else ALPACA_NO_INPUT
        return template.format(instruction=instruction, input=extra, output=output)
    if fmt == "text":
        value = _need(record, index, text_field, fmt, f"the text field {text_field!r} (spec.dataset.textField)")
        return str(value)
    if fmt == "chat":
        messages = _need(record, index, "messages", fmt, "messages: [{role, content}, ...]")
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                     for m in messages):
            raise BadConfig(f"spec.dataset.format: record {index}: messages must be a list of {{role, content}}")
        if not getattr(tokenizer, "chat_template", None):
            raise BadConfig("spec.dataset.format: chat needs a tokenizer with a chat template; this model's "
                            "tokenizer has none")
        return tokenizer.apply_chat_template(messages, tokenize=False)
    raise BadConfig(f"spec.dataset.format: {fmt!r} is not one of alpaca, chat, text")


@dataclass
class DataStats:
    """What tokenization did to the records: the evidence behind data warnings."""

    records: int = 0
    examples: int = 0  # kept: two or more tokens
    empty: int = 0  # dropped: no text, or fewer than two tokens
    truncated: int = 0  # longer than maxSeqLength before truncation
    median_tokens: float = 0.0  # per kept example, after truncation

    def as_dict(self) -> dict[str, Any]:
        return {"records": self.records, "examples": self.examples, "empty": self.empty,
                "truncated": self.truncated, "median_tokens": self.median_tokens}


# A run is warned about (log line + summary.json data_warnings) when most rows are cut or empty, or the rows are
# so short the model learns next to nothing (a run on 2-token rows trained without a word).
TRUNCATED_WARN_FRACTION = 0.5
EMPTY_WARN_FRACTION = 0.5
MEDIAN_TOKENS_WARN = 8


def data_warnings(stats: DataStats, max_seq_length: int, fmt: str) -> list[str]:
    warnings = []
    if stats.records and stats.truncated / stats.records > TRUNCATED_WARN_FRACTION:
        warnings.append(f"{stats.truncated} of {stats.records} examples ({stats.truncated / stats.records:.0%}) "
                        f"are longer than model.maxSeqLength {max_seq_length} and were truncated: raise "
                        f"maxSeqLength or shorten the examples")
    if stats.records and stats.empty / stats.records > EMPTY_WARN_FRACTION:
        warnings.append(f"{stats.empty} of {stats.records} records ({stats.empty / stats.records:.0%}) are empty "
                        f"or under two tokens and were dropped: check dataset.format ({fmt}) and textField")
    if stats.examples and stats.median_tokens < MEDIAN_TOKENS_WARN:
        warnings.append(f"the median example has {stats.median_tokens:g} tokens (< {MEDIAN_TOKENS_WARN}): the "
                        f"tokenizer produced almost nothing per row; check dataset.format ({fmt}), textField and "
                        f"that the tokenizer matches the data")
    return warnings


def tokenize(texts: Sequence[str], tokenizer: Any, max_seq_length: int, fmt: str,
             stats: Optional[DataStats] = None) -> list[list[int]]:
    """Token ids per example: BOS + text + EOS (a chat template writes its own special tokens)."""
    stats = stats if stats is not None else DataStats()
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    examples = []
    for text, ids in zip(texts, encoded):
        stats.records += 1
        if not text.strip():
            stats.empty += 1
            continue
        if fmt != "chat":
            if bos is not None and (not ids or ids[0] != bos):
                ids = [bos] + ids
            if eos is not None:
                ids = ids + [eos]
        if len(ids) > max_seq_length:
            stats.truncated += 1
        ids = ids[:max_seq_length]
        if len(ids) >= 2:  # a single token has nothing to predict
            examples.append(ids)
        else:
            stats.empty += 1
    stats.examples = len(examples)
    if examples:
        import statistics
        stats.median_tokens = float(statistics.median(len(ids) for ids in examples))
    return examples


def pack(examples: Sequence[list[int]], max_seq_length: int) -> list[list[list[int]]]:
    """Greedy in-order packing: consecutive examples share a row while it stays within max_seq_length."""
    packs: list[list[list[int]]] = []
    current: list[list[int]] = []
    length = 0
    for ids in examples:
        if current and length + len(ids) > max_seq_length:
            packs.append(current)
            current, length = [], 0
        current.append(ids)
        length += len(ids)
    if current:
        packs.append(current)
    return packs


@dataclass
class TrainingData:
    """Rows ready for a collator: a row is one example, or several when packed (seq_lengths says where each
    starts). The field names are TRL's (input_ids, seq_lengths), so TRL's own padding-free collator reads them
    the same way if a trainer swaps it in."""

    rows: list[list[list[int]]]
    packing: bool
    examples: int
    tokens: int
    stats: DataStats = field(default_factory=DataStats)
    warnings: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        segments = self.rows[index]
        return {"input_ids": [t for s in segments for t in s], "seq_lengths": [len(s) for s in segments]}

    def as_hf_dataset(self):
        """A datasets.Dataset of the rows, for trainers that expect one (TRL's SFTTrainer inspects columns)."""
        from datasets import Dataset
        return Dataset.from_list([self[i] for i in range(len(self))])


def build_training_data(source: Any, *, fmt: str, text_field: str, max_samples: Optional[int],
                        tokenizer: Any, max_seq_length: int, packing: bool,
                        records: Optional[list[dict[str, Any]]] = None) -> TrainingData:
    """`source`: a sources.DatasetSource or a list of local files (`records` already loaded: used as they are)."""
    if records is None:
        records = read_records(source, max_samples)
    texts = [render(record, i, fmt, text_field, tokenizer) for i, record in enumerate(records)]
    stats = DataStats()
    examples = tokenize(texts, tokenizer, max_seq_length, fmt, stats)
    if not examples:
        raise BadConfig("spec.dataset: no example has two or more tokens after tokenization")
    rows = pack(examples, max_seq_length) if packing else [[ids] for ids in examples]
    return TrainingData(rows=rows, packing=packing, examples=len(examples), tokens=sum(map(len, examples)),
                        stats=stats, warnings=data_warnings(stats, max_seq_length, fmt))


class CausalLMCollator:
    """Rows -> a batch. Unpacked: right-padded with an attention mask, padding ignored by the loss. Packed:
    every segment of the batch in one padding-free row; position_ids restart per segment so attention keeps
    segments apart (needs use_cache=False), and no segment's first token is predicted from the previous one."""

    def __init__(self, pad_token_id: int, packing: bool):
        self.pad_token_id = pad_token_id
        self.packing = packing

    def __call__(self, batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        segments = []
        for item in batch:
            start = 0
            for length in item["seq_lengths"]:
                segments.append(list(item["input_ids"][start:start + length]))
                start += length
        if self.packing:
            input_ids, labels, positions = [], [], []
            for segment in segments:
                input_ids += segment
                labels += [IGNORE_INDEX] + segment[1:]
                positions += list(range(len(segment)))
            return {"input_ids": torch.tensor([input_ids]), "labels": torch.tensor([labels]),
                    "position_ids": torch.tensor([positions])}
        longest = max(len(s) for s in segments)
        input_ids = torch.full((len(segments), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(segments), longest), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(segments), longest), dtype=torch.long)
        for row, segment in enumerate(segments):
            ids = torch.tensor(segment)
            input_ids[row, :len(segment)] = ids
            labels[row, :len(segment)] = ids
            attention[row, :len(segment)] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|reserved_special_token_0|>")


def ensure_pad_token(tokenizer: Any) -> int:
    """A pad id for batching. Padding never reaches the loss or attention, but the trained-token count skips the
    pad id, so an unused special token (Llama 3's finetune pad, a reserved one) beats EOS, the last resort."""
    if tokenizer.pad_token_id is None:
        vocab = tokenizer.get_vocab()
        tokenizer.pad_token = next((t for t in PAD_CANDIDATES if t in vocab), tokenizer.eos_token)
    return tokenizer.pad_token_id
