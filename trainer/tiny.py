"""`python -m kubesloth.trainer.tiny --out DIR`: a tiny random-init Llama (2 layers, hidden 64) with a byte-level
BPE tokenizer trained offline on the bundled alpaca-tiny data, a chat template, safetensors. Deterministic
(seeded) and fast; the local demo and the tests train it. No download anywhere."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = REPO_ROOT / "examples" / "data" / "alpaca-tiny.jsonl"
SPECIAL = {"bos": "<|bos|>", "eos": "<|eos|>", "pad": "<|pad|>"}
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def corpus_lines(path: Path) -> list[str]:
    from kubesloth.trainer.data import ALPACA_NO_INPUT, ALPACA_WITH_INPUT

    lines = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if "instruction" in record:
            template = ALPACA_WITH_INPUT if record.get("input") else ALPACA_NO_INPUT
            lines.append(template.format(instruction=record["instruction"], input=record.get("input", ""),
                                         output=record.get("output", "")))
        else:
            lines.append(json.dumps(record))
    lines.append("<|system|>\n<|user|>\n<|assistant|>\n")
    return lines


def build_tokenizer(lines: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(lines, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=SPECIAL["bos"],
                                   eos_token=SPECIAL["eos"], pad_token=SPECIAL["pad"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model(out: Path, corpus: Path = DEFAULT_CORPUS, seed: int = 0, vocab_size: int = 512,
                    hidden: int = 64, layers: int = 2) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(corpus_lines(corpus), vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, use_cache=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubesloth.trainer.tiny", description=__doc__)
    parser.add_argument("--out", required=True, type=Path, help="directory to write the model into")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="jsonl the tokenizer is trained on")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = make_tiny_model(args.out, args.corpus, args.seed)
    print(f"tiny model written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
