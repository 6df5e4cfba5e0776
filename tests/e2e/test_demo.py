"""Issue 14 must-show: after `make demo` (`kubesloth dev demo`: its own local control plane, operator and node agent,
examples/finetunejob-tiny.yaml, the real trainer) the model directory holds a model card that is correct: it
parses as a Hugging Face model card, names the base model, the data and the FineTuneJob, and its figures are the
run's own (summary.json)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from kubesloth.local.cluster import REPO_ROOT

EXAMPLE = REPO_ROOT / "examples" / "finetunejob-tiny.yaml"


@pytest.mark.cluster
def test_make_demo_leaves_a_correct_model_card(tmp_path):
    state = tmp_path / ".kubesloth" / "cluster"
    # What `make demo` runs ($(BIN)/kubesloth dev demo), with its state under tmp instead of the checkout.
    proc = subprocess.run([sys.executable, "-m", "kubesloth.cli", "dev", "demo", "--state-dir", str(state),
                           "--example", str(EXAMPLE), "--timeout", "400"], capture_output=True, text=True,
                          timeout=560, cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    spec = yaml.safe_load(EXAMPLE.read_text())["spec"]
    out = tmp_path / ".kubesloth" / "volumes" / "outputs" / "tiny-alpaca"
    model = out / "model"
    assert f"the fine-tuned model is in {model}" in output, output[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    card_path = model / "README.md"
    assert summary["model_card"].endswith("/model/README.md") and card_path.is_file()

    from huggingface_hub import ModelCard
    card = ModelCard.load(card_path)
    assert {"kubesloth", "full-fine-tuning", "format-alpaca"} <= set(card.data.tags)
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert card.data.base_model is None and card.data.datasets is None  # pvc:// sources: no hub ids to name
    text = card.text
    assert text.lstrip().startswith("# tiny-alpaca\n")
    assert f"Full fine-tuning (every weight trained) of `{spec['model']['source']}`" in text
    assert "by kubesloth (FineTuneJob default/tiny-alpaca)" in text
    assert f"source `{spec['dataset']['source']}`, split `train`, format `alpaca`" in text
    assert f"| final loss | {summary['final_loss']:.6g} |" in text
    assert f"| steps | {spec['training']['maxSteps']} of {spec['training']['maxSteps']} " in text
    assert f"| tokens trained | {summary['tokens']} |" in text and summary["tokens"] > 0
    assert "## Hyperparameters" in text and "| learning_rate | 0.003 |" in text
    assert f"engine `{summary['engine']}`" in text and "## Memory plan" in text
    # The card is one of the model's files, counted in the summary like the weights.
    files = [p for p in model.iterdir() if p.is_file()]
    assert card_path in files and summary["model"]["files"] == len(files)
    assert (model / "model.safetensors").is_file() and (model / "config.json").is_file()
