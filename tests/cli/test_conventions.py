"""Kubernetes conventions: kubectl explain has a description for every field, conditions are metav1.Condition
shaped with observedGeneration and a map keyed by type, status.progress.eta for the ETA column, JSON logs for the
operator (kopf --log-format) and the trainer (KUBESLOTH_LOG_FORMAT=json), a time stamp on the step line."""

from __future__ import annotations

import io
import json
from datetime import datetime, timezone

from kubesloth.api import contract, crd
from kubesloth.api.v1alpha1 import PRINTER_COLUMNS
from kubesloth.cli import kopf_argv
from kubesloth.operator.progress import TrainerSample, build_progress
from kubesloth.operator.status import merge_conditions

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)


def _undescribed(node, path, out):
    for name, sub in (node.get("properties") or {}).items():
        here = f"{path}.{name}"
        # metadata: the API server allows nothing but its type there (kubectl explain shows ObjectMeta's own)
        if not sub.get("description") and here != ".metadata":
            out.append(here)
        _undescribed(sub, here, out)
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            _undescribed(node[key], f"{path}[]", out)
    return out


def test_every_field_of_the_crd_has_a_description():
    schema = crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert schema.get("description")
    assert _undescribed(schema, "", []) == []


def test_conditions_are_a_map_of_metav1_conditions():
    conditions = crd.openapi_schema()["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert conditions["items"]["required"] == ["type", "status", "reason", "message", "lastTransitionTime"]
    assert "observedGeneration" in conditions["items"]["properties"]


def test_merged_conditions_carry_a_message_and_the_generation():
    merged = merge_conditions([], [{"type": "Succeeded", "status": "False", "reason": "Pending"},
                                   {"type": "Running", "status": "True", "reason": "R", "message": None}], NOW, 3)
    for cond in merged:
        # never empty: v1.20's API server refuses "" in a required string (tests/e2e/test_cli.py writes them)
        assert cond["message"] and cond["observedGeneration"] == 3 and cond["lastTransitionTime"]
    assert "observedGeneration" not in merge_conditions([], [{"type": "X", "status": "True", "reason": "R"}], NOW)[0]


def test_eta_column_reads_a_human_eta():
    assert {"name": "ETA", "type": "string", "jsonPath": ".status.progress.eta"} in PRINTER_COLUMNS
    progress = build_progress(TrainerSample({contract.METRIC_STEP: 10, contract.METRIC_STEPS_PLANNED: 40,
                                             contract.METRIC_ETA: 252.4}), NOW)
    assert (progress["display"], progress["etaSeconds"], progress["eta"]) == ("10/40", 252.4, "4m12s")


def test_the_operator_logs_json_when_asked():
    assert kopf_argv([], (), "json")[-1] == "--log-format=json"
    assert "--log-format=json" not in kopf_argv(["--log-format=plain"], (), "json")
    assert not any(a.startswith("--log-format") for a in kopf_argv([], ()))


def _step_line(monkeypatch, fmt):
    from kubesloth.trainer.callbacks import ProgressLog, StepEvent

    if fmt:
        monkeypatch.setenv("KUBESLOTH_LOG_FORMAT", fmt)
    else:
        monkeypatch.delenv("KUBESLOTH_LOG_FORMAT", raising=False)
    out = io.StringIO()
    ProgressLog(out).on_step(StepEvent(step=3, total_steps=8, epoch=0.5, loss=1.5, learning_rate=1e-5,
                                       tokens_total=100, tokens_per_second=800.0, eta_seconds=12.0,
                                       memory={"host_rss": 2**30}))
    return out.getvalue()


def test_the_trainer_step_line_has_a_time_stamp_or_is_json(monkeypatch):
    plain = _step_line(monkeypatch, None)
    stamp, rest = plain.split(" ", 1)
    assert datetime.fromisoformat(stamp.replace("Z", "+00:00")).tzinfo is not None
    assert rest.startswith("[trainer] step 3/8 loss 1.5000 ")
    record = json.loads(_step_line(monkeypatch, "json"))
    assert {"time", "level", "message"} <= set(record) and record["level"] == "info"
    assert (record["step"], record["totalSteps"], record["loss"], record["etaSeconds"]) == (3, 8, 1.5, 12.0)
    assert record["message"].startswith("step 3/8 loss 1.5000")


def test_other_trainer_lines_in_json(monkeypatch, capsys):
    from kubesloth.trainer.main import log

    monkeypatch.setenv("KUBESLOTH_LOG_FORMAT", "json")
    log("saving the model")
    record = json.loads(capsys.readouterr().out)
    assert record["message"] == "saving the model" and record["level"] == "info"
    monkeypatch.delenv("KUBESLOTH_LOG_FORMAT")
    log("saving the model")
    assert capsys.readouterr().out == "[trainer] saving the model\n"
