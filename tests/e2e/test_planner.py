"""The memory planner before scheduling, end to end: the real operator reads the model's config.json where the
node agent mounts it, writes status.estimate and the Fits condition, refuses what cannot fit before any Job or
ConfigMap exists, and the real trainer (CPU engine) runs the same plan."""

from __future__ import annotations

import json

import pytest

from .conftest import make_stack
from .stack import finetunejob, wait_for

# Llama-3.1-8B's config.json values: the planner needs only the shape (no weights here).
LLAMA_8B_CONFIG = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                   "tie_word_embeddings": False, "max_position_embeddings": 131072}
AUTO = {"profile": "auto", "maxSteps": 4, "learningRate": 3e-3, "lrScheduler": "constant", "warmupRatio": 0.0}


@pytest.fixture(scope="module")
def stack(cluster, tmp_path_factory, tiny_model):
    stack = make_stack(cluster, tmp_path_factory, tiny_model, {"KUBESLOTH_OPERATOR_ENGINE": "cpu"})
    stack.stop()
    stack.operator_env["KUBESLOTH_OPERATOR_VOLUME_ROOT"] = str(stack.volumes)
    models = stack.volumes / "models"
    (models / "llama-8b-shape").mkdir()
    (models / "llama-8b-shape" / "config.json").write_text(json.dumps(LLAMA_8B_CONFIG))
    (models / "gpt2-shape").mkdir()
    (models / "gpt2-shape" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 768}))
    (models / "no-config").mkdir()
    stack.start()
    yield stack
    stack.stop()


def training(**extra):
    return {**AUTO, **extra}


def nothing_created(k8s, name: str) -> bool:
    return k8s.get("job", f"{name}-trainer") is None and k8s.get("configmap", f"{name}-config") is None


def refused(k8s, name: str, reason: str) -> dict:
    fits = wait_for(f"Fits=False ({reason})", lambda: (k8s.condition(name, "Fits") or {}).get("reason") == reason
                    and k8s.condition(name, "Fits"), timeout=30)
    assert fits["status"] == "False"
    assert nothing_created(k8s, name)
    assert k8s.phase(name) == "Pending"
    warnings = [e for e in k8s.events(name) if e["type"] == "Warning" and e["reason"] == reason]
    assert len(warnings) == 1, k8s.events(name)
    return fits


def test_a_job_that_cannot_fit_is_refused_with_what_would_fit(stack, k8s):
    name = "too-big"
    k8s.apply(finetunejob(name, model={"source": "pvc://models/llama-8b-shape", "maxSeqLength": 16384},
                          training=training(), resources={"gpuMemoryGiB": 20}))
    fits = refused(k8s, name, "DoesNotFit")
    assert fits["message"].startswith("spec.resources.gpuMemoryGiB: ")
    estimate = k8s.status(name)["estimate"]
    assert estimate["fits"] is False and estimate["budgetBytes"] == 20 * 2**30
    assert estimate["gpuMemoryBytes"] > estimate["budgetBytes"]
    # Each suggestion is one the planner honours: the bigger budget it names, applied, is accepted.
    budget = next(s["value"] for s in estimate["suggestions"] if s["field"] == "spec.resources.gpuMemoryGiB")
    k8s.apply(finetunejob(name, model={"source": "pvc://models/llama-8b-shape", "maxSeqLength": 16384},
                          training=training(), resources={"gpuMemoryGiB": budget}, suspend=True))
    wait_for("Fits=True after the suggested budget", lambda: (k8s.condition(name, "Fits") or {}).get("status")
             == "True", timeout=30)
    assert k8s.status(name)["estimate"]["fits"] is True


def test_a_budget_below_the_weights_names_the_field(stack, k8s):
    name = "below-weights"
    k8s.apply(finetunejob(name, model={"source": "pvc://models/llama-8b-shape", "maxSeqLength": 2048},
                          training=training(), resources={"gpuMemoryGiB": 8}))
    fits = refused(k8s, name, "DoesNotFit")
    assert "spec.resources.gpuMemoryGiB" in fits["message"] and "below the model's bf16 weights" in fits["message"]


@pytest.mark.parametrize("model,words", [("pvc://models/no-config", "does not exist"),
                                         ("pvc://models/gpt2-shape", "model_type 'gpt2' is not supported")])
def test_a_missing_or_unknown_model_config_names_the_source(stack, k8s, model, words):
    name = "bad-config-" + model.rsplit("/", 1)[-1]
    k8s.apply(finetunejob(name, model={"source": model, "maxSeqLength": 2048}, training=training(),
                          resources={"gpuMemoryGiB": 80}))
    fits = refused(k8s, name, "ModelConfigUnusable")
    assert fits["message"].startswith("spec.model.source: ") and words in fits["message"]


def test_a_job_that_fits_shows_its_estimate_and_the_trainer_runs_that_plan(stack, k8s):
    name = "fits"
    k8s.apply(finetunejob(name, training=training(perDeviceBatchSize=2, gradientAccumulationSteps=2),
                          resources={"gpuMemoryGiB": 24, "memory": "4Gi", "cpu": "1"}))
    job = wait_for("the trainer Job", lambda: k8s.get("job", f"{name}-trainer"), timeout=30)
    status = k8s.status(name)
    estimate = status["estimate"]
    assert estimate["fits"] is True and k8s.condition(name, "Fits")["status"] == "True"
    assert estimate["plan"]["sequencesPerStep"] == 4  # the user's 2 x 2, kept as sequences per step
    assert [c["field"] for c in estimate["changes"]][:1] == ["spec.training.gradientAccumulationSteps"]
    assert any(e["reason"] == "PlanChangedFields" for e in k8s.events(name))
    assert estimate["shape"].endswith("(config.json)")
    # The grace period covers the planned checkpoint write.
    pod_spec = job["spec"]["template"]["spec"]
    assert pod_spec["terminationGracePeriodSeconds"] >= 90

    wait_for("phase Succeeded", lambda: k8s.phase(name) == "Succeeded", timeout=240, every=0.5)
    summary = json.loads((stack.volumes / "outputs" / name / "summary.json").read_text())
    plan = summary["plan"]
    # Same inputs, same plan: the trainer's layout is the operator's.
    assert (plan["placement"], plan["sequences_per_step"], plan["uncheckpointed_layers"], plan["optimizer"]) == (
        estimate["plan"]["placement"], estimate["plan"]["sequencesPerStep"],
        estimate["plan"]["uncheckpointedLayers"], estimate["plan"]["optimizer"])
    assert plan["predicted"]["device_bytes"] == estimate["gpuMemoryBytes"]
    assert summary["hyperparameters"]["per_device_batch_size"] == 4
