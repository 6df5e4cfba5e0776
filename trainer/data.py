"""Dataset loading, formatting and tokenization, shared by every engine (HF Trainer based or a manual loop).

Records come from .jsonl/.json/.parquet files; each is rendered to text by its format (alpaca, chat, text),
tokenized, truncated to maxSeqLength, and optionally packed. The loss is on all tokens of an example (prompt
included) for every format: simple, and what the classic alpaca recipes did.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from kubesloth.trainer.errors import BadConfig, SourceNotFound

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


def read_records(files: Sequence[Path], max_samples: Optional[int] = None) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for path in files:
        try:
            if path.suffix == ".parquet":
                import pyarrow.parquet as pq
                records.extend(pq.read_table(path).to_pylist())
            elif path.suffix == ".jsonl":
                with path.open() as handle:
                    for number, line in enumerate(handle, 1):
                        if line.strip():
                            try:
                                records.append(json.loads(line))
                            except json.JSONDecodeError as exc:
                                raise BadConfig(f"spec.dataset.source: {path.name} line {number} is not JSON: "
                                                f"{exc.msg}") from None
            else:
                doc = json.loads(path.read_text())
                if isinstance(doc, dict):  # {"train": [...]} or {"data": [...]}
                    doc = next((v for v in doc.values() if isinstance(v, list)), None)
                if not isinstance(doc, list):
                    raise BadConfig(f"spec.dataset.source: {path.name} must hold a JSON list of records")
                records.extend(doc)
        except (BadConfig, SourceNotFound):
            raise
        except json.JSONDecodeError as exc:
            raise BadConfig(f"spec.dataset.source: {path.name} is not JSON: {exc.msg}") from None
        except OSError as exc:
            raise SourceNotFound(f"spec.dataset.source: {path} cannot be read: {exc.strerror or exc}") from None
        except Exception as exc:  # e.g. pyarrow's ArrowInvalid on a broken parquet file
            raise BadConfig(f"spec.dataset.source: {path.name} cannot be parsed: {type(exc).__name__}: {exc}"
                            ) from None
        if max_samples and len(records) >= max_samples:
            break
    records = records[:max_samples] if max_samples else records
    if not records:
        raise BadConfig("spec.dataset.source: the dataset has no records")
    return records


def _need(record: dict, index: int, key: str, fmt: str, needs: str) -> Any:
    if not isinstance(record, dict) or record.get(key) is None:
        raise BadConfig(f"spec.dataset.format: record {index} has no field {key!r} (format {fmt} needs {needs})")
    return record[key]


def render(record: dict, index: int, fmt: str, text_field: str, tokenizer: Any) -> str:
    """One record as training text (special tokens added later, except what a chat template writes)."""
    if fmt == "alpaca":
        needs = "instruction, output; input optional"
        instruction = _need(record, index, "instruction", fmt, needs)
        output = _need(record, index, "output", fmt, needs)
        extra = record.get("input") or ""
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


def tokenize(texts: Sequence[str], tokenizer: Any, max_seq_length: int, fmt: str) -> list[list[int]]:
    """Token ids per example: BOS + text + EOS (a chat template writes its own special tokens)."""
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    examples = []
    for ids in encoded:
        if fmt != "chat":
            if bos is not None and (not ids or ids[0] != bos):
                ids = [bos] + ids
            if eos is not None:
                ids = ids + [eos]
        ids = ids[:max_seq_length]
        if len(ids) >= 2:  # a single token has nothing to predict
            examples.append(ids)
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

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        segments = self.rows[index]
        return {"input_ids": [t for s in segments for t in s], "seq_lengths": [len(s) for s in segments]}

    def as_hf_dataset(self):
        """A datasets.Dataset of the rows, for trainers that expect one (TRL's SFTTrainer inspects columns)."""
        from datasets import Dataset
        return Dataset.from_list([self[i] for i in range(len(self))])


def build_training_data(files: Sequence[Path], *, fmt: str, text_field: str, max_samples: Optional[int],
                        tokenizer: Any, max_seq_length: int, packing: bool) -> TrainingData:
    records = read_records(files, max_samples)
    texts = [render(record, i, fmt, text_field, tokenizer) for i, record in enumerate(records)]
    examples = tokenize(texts, tokenizer, max_seq_length, fmt)
    if not examples:
        raise BadConfig("spec.dataset: no example has two or more tokens after tokenization")
    rows = pack(examples, max_seq_length) if packing else [[ids] for ids in examples]
    return TrainingData(rows=rows, packing=packing, examples=len(examples), tokens=sum(map(len, examples)))


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
