"""Dataset formats and files, tokenization, packing (and that packed examples do not attend to each other)."""

from __future__ import annotations

import json

import pytest
import torch

from kubesloth.trainer.data import (IGNORE_INDEX, CausalLMCollator, build_training_data, pack, read_records,
                                    render)
from kubesloth.trainer.errors import BadConfig

ALPACA = [{"instruction": "Add one.", "input": "4", "output": "5"},
          {"instruction": "Say hi.", "output": "hi"}]


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_model)


def write(path, records, kind):
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif kind == "json":
        path.write_text(json.dumps(records))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(records), path)
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet"])
def test_file_types_read_the_same_records(tmp_path, kind):
    path = write(tmp_path / f"data.{kind}", ALPACA, kind)
    records = read_records([path])
    assert [r["instruction"] for r in records] == ["Add one.", "Say hi."]
    assert read_records([path], max_samples=1) == records[:1]


def test_alpaca_with_and_without_input(tokenizer):
    with_input = render(ALPACA[0], 0, "alpaca", "text", tokenizer)
    assert "### Instruction:\nAdd one.\n\n### Input:\n4\n\n### Response:\n5" in with_input
    without = render(ALPACA[1], 1, "alpaca", "text", tokenizer)
    assert "### Input" not in without and without.endswith("### Response:\nhi")


def test_text_and_chat(tokenizer):
    assert render({"body": "plain words"}, 0, "text", "body", tokenizer) == "plain words"
    chat = render({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
                  0, "chat", "text", tokenizer)
    assert chat == "<|bos|><|user|>\nhi<|eos|>\n<|assistant|>\nyo<|eos|>\n"  # the tokenizer's own template


@pytest.mark.parametrize("fmt,record,message", [
    ("alpaca", {"instruction": "x"}, "record 0 has no field 'output'"),
    ("text", {"content": "x"}, "no field 'text'"),
    ("chat", {"messages": "hello"}, "messages must be a list"),
    ("chat", {"text": "x"}, "no field 'messages'"),
])
def test_records_not_matching_the_format(tokenizer, fmt, record, message):
    with pytest.raises(BadConfig, match=message):
        render(record, 0, fmt, "text", tokenizer)


def test_tokenized_examples_have_bos_eos_and_are_truncated(tmp_path, tokenizer):
    data = build_training_data([write(tmp_path / "d.jsonl", ALPACA, "jsonl")], fmt="alpaca", text_field="text",
                               max_samples=None, tokenizer=tokenizer, max_seq_length=16, packing=False)
    assert data.examples == 2 and len(data) == 2
    for row in data.rows:
        assert row[0][0] == tokenizer.bos_token_id and len(row[0]) <= 16
    long = build_training_data([write(tmp_path / "d.jsonl", ALPACA, "jsonl")], fmt="alpaca", text_field="text",
                               max_samples=None, tokenizer=tokenizer, max_seq_length=1000, packing=False)
    assert all(row[0][-1] == tokenizer.eos_token_id for row in long.rows)


def test_pack_is_greedy_and_in_order():
    assert pack([[1] * 5, [2] * 4, [3] * 3, [4] * 8], 10) == [[[1] * 5, [2] * 4], [[3] * 3], [[4] * 8]]


def test_collator_pads_unpacked_rows():
    batch = CausalLMCollator(pad_token_id=0, packing=False)([{"input_ids": [5, 6, 7], "seq_lengths": [3]},
                                                             {"input_ids": [8, 9], "seq_lengths": [2]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, 9, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_packed_examples_do_not_see_each_other(tiny_model):
    """Logits of a packed row equal each example's logits alone: position_ids restart per example and the
    model (use_cache off) keeps them apart; no example's first token is a target of the previous one."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa").eval()
    model.config.use_cache = False
    first, second = [1, 20, 30, 40, 50], [1, 60, 70, 80]
    batch = CausalLMCollator(pad_token_id=2, packing=True)([{"input_ids": first + second, "seq_lengths": [5, 4]}])
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 20, 30, 40, 50, IGNORE_INDEX, 60, 70, 80]]
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        alone = [model(input_ids=torch.tensor([ids])).logits[0] for ids in (first, second)]
    assert torch.allclose(packed, torch.cat(alone), atol=1e-5)


def test_pad_token_prefers_an_unused_special_token(tokenizer):
    import copy

    from kubesloth.trainer.data import ensure_pad_token

    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    assert ensure_pad_token(no_pad) == tokenizer.convert_tokens_to_ids("<|pad|>")  # in the vocab, unused
    no_pad.add_special_tokens({"additional_special_tokens": ["<|finetune_right_pad_id|>"]})
    no_pad.pad_token = None
    assert ensure_pad_token(no_pad) == no_pad.convert_tokens_to_ids("<|finetune_right_pad_id|>")
