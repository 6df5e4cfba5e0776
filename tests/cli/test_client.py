"""The user's commands without a cluster: outcomes and exit codes, the table, the progress line and printer, the
notebook builder, argument parsing (docs/cli.md)."""

from __future__ import annotations

import io
import json
from datetime import datetime, timezone

import pytest
from pydantic import ValidationError

from kubesloth import cli
from kubesloth.client import (Exit, FineTuneJob, describe, event_line, human_duration, outcome, progress_line,
                              result_of, table)
from kubesloth.local.cluster import REPO_ROOT

NOW = datetime(2026, 12, 1, 12, 0, 0, tzinfo=timezone.utc)


def ftj(phase=None, generation=1, observed=1, conditions=(), progress=None, **status):
    body = {"apiVersion": "kubesloth.io/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "tiny", "namespace": "ml", "generation": generation,
                         "creationTimestamp": "2026-12-01T11:58:51Z"},
            "spec": {"model": {"source": "pvc://models/tiny"}, "output": {"destination": "pvc://outputs/tiny"}},
            "status": {"observedGeneration": observed, "conditions": list(conditions), **status}}
    if phase:
        body["status"]["phase"] = phase
    if progress:
        body["status"]["progress"] = progress
    return body


def cond(kind, status, reason, message="m"):
    return {"type": kind, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": "2026-12-01T11:59:00Z"}


@pytest.mark.parametrize("seconds,text", [(0, "0s"), (37.9, "37s"), (119, "119s"), (252, "4m12s"), (240, "4m"),
                                          (42 * 60, "42m"), (4 * 3600 + 5 * 60, "4h5m"), (125 * 60, "125m"), (30 * 3600, "30h"),
                                          (3 * 86400 + 4 * 3600, "3d4h"), (20 * 86400, "20d"), (-5, "0s")])
def test_durations_read_like_kubectl_ages(seconds, text):
    assert human_duration(seconds) == text
    assert human_duration(None) is None and human_duration(float("nan")) is None


def test_outcomes_and_their_exit_codes():
    assert outcome(ftj("Succeeded", conditions=[cond("Succeeded", "True", "Completed")])).code == Exit.SUCCEEDED
    failed = outcome(ftj("Failed", conditions=[cond("Failed", "True", "SourceNotFound", "no such file")]))
    assert (failed.code, failed.reason, failed.message) == (Exit.FAILED, "SourceNotFound", "no such file")
    assert failed.describe() == "Failed: SourceNotFound: no such file"
    assert outcome(ftj("Running", conditions=[cond("Running", "True", "TrainerRunning")])).code is None
    # refused: nothing is created until the spec changes
    fits = outcome(ftj("Pending", conditions=[cond("Fits", "False", "DoesNotFit", "needs 40Gi")]))
    assert fits.code == Exit.REFUSED and fits.describe().startswith("Refused: DoesNotFit")
    assert outcome(ftj("Pending", conditions=[cond("Running", "False", "InvalidSpec")])).code == Exit.REFUSED
    # ... but only once the operator has seen this generation (a fixed spec is not refused by the old status)
    assert outcome(ftj("Pending", generation=2, conditions=[cond("Running", "False", "InvalidSpec")])).code is None
    assert outcome(ftj("Pending", conditions=[cond("Running", "False", "Unschedulable")])).code is None
    assert outcome({"metadata": {"name": "x"}}).code is None


def test_the_table_is_the_crds_printer_columns():
    items = [ftj("Running", progress={"display": "12/30", "tokensPerSecond": 26297.5, "eta": "12s", "loss": 1.25,
                                      "peakGpuMemory": "33.4Gi"})]
    lines = table(items, now=NOW).splitlines()
    assert lines[0].split() == ["NAME", "PHASE", "PROGRESS", "TOKENS/S", "ETA", "PEAK", "GPU", "MEM", "AGE"]
    assert lines[1].split() == ["tiny", "Running", "12/30", "26297.5", "12s", "33.4Gi", "69s"]
    wide = table(items, wide=True, all_namespaces=True, now=NOW).splitlines()
    assert wide[0].split()[:4] == ["NAMESPACE", "NAME", "PHASE", "PROGRESS"] and "LOSS" in wide[0]
    assert wide[1].split()[:2] == ["ml", "tiny"] and "pvc://models/tiny" in wide[1] and "1.25" in wide[1]


def test_the_progress_line():
    body = ftj("Running", progress={"step": 12, "totalSteps": 30, "loss": 1.23456, "tokensPerSecond": 26297.0,
                                    "etaSeconds": 252.0}, startTime="2026-12-01T11:59:00Z")
    line = progress_line(body, bar_width=10, now=NOW)
    assert line == "tiny Running [####------] 12/30 loss 1.2346 26.3k tok/s ETA 4m12s elapsed 60s"
    assert progress_line(body, bar_width=0, now=NOW).startswith("tiny Running 12/30 loss")
    done = ftj("Succeeded", progress={"step": 30, "totalSteps": 30, "etaSeconds": 0.0},
               startTime="2026-12-01T11:59:00Z", completionTime="2026-12-01T11:59:30Z")
    assert "ETA" not in progress_line(done) and progress_line(done).endswith("elapsed 30s")
    assert event_line(ftj("Pending", message="waiting", conditions=[cond("Running", "False", "PodStarting")])) \
        == "Pending (PodStarting): waiting"


class Tty(io.StringIO):
    def isatty(self):
        return True


def _steps(printer, steps):
    for step in steps:
        printer.update(ftj("Running", progress={"step": step, "totalSteps": 4}, message="trainer pod p is running",
                           conditions=[cond("Running", "True", "TrainerRunning")]))


def test_on_a_terminal_one_line_is_rewritten():
    out = Tty()
    printer = cli.ProgressPrinter(out, stamp=lambda: "12:00:00")
    printer.update(ftj("Pending", message="creating"))
    _steps(printer, [1, 2, 3])
    printer.close()
    text = out.getvalue()
    assert text.count("\r\x1b[K") == 3 and text.count("12:00:00 Running (TrainerRunning)") == 1
    assert text.endswith("3/4\n") and "12:00:00 Pending: creating\n" in text


def test_elsewhere_plain_lines_at_most_every_n_seconds():
    out, now = io.StringIO(), [0.0]
    printer = cli.ProgressPrinter(out, plain_every=10, clock=lambda: now[0], stamp=lambda: "T")
    for step in (1, 2, 3):
        now[0] += 6
        _steps(printer, [step])
    printer.close()
    text = out.getvalue()
    assert "\r" not in text
    assert [line for line in text.splitlines() if "/4" in line] == ["T tiny Running 1/4", "T tiny Running 3/4"]


def test_finish_prints_the_outcome_and_returns_its_code(capsys):
    ok = ftj("Succeeded", progress={"step": 30, "loss": 1.1783}, startTime="2026-12-01T11:59:00Z",
             completionTime="2026-12-01T11:59:09Z", conditions=[cond("Succeeded", "True", "Completed")])
    assert cli.finish(ok, "kubesloth submit") == 0
    out = capsys.readouterr().out
    assert "tiny Succeeded in 9s: 30 steps, final loss 1.1783" in out and "model: pvc://outputs/tiny/model" in out
    bad = ftj("Failed", conditions=[cond("Failed", "True", "OutOfMemory", "CUDA out of memory")])
    assert cli.finish(bad, "kubesloth submit") == 1
    assert "tiny Failed: OutOfMemory: CUDA out of memory" in capsys.readouterr().err
    refused = ftj("Pending", conditions=[cond("Running", "False", "ImageNotAllowed", "spec.image: no")])
    assert cli.finish(refused, "kubesloth wait") == 3
    assert cli.finish(ftj("Running"), "kubesloth wait", "Running") == 0
    assert cli.finish(ok, "kubesloth wait", "Running") == 1


def test_result_from_status_output_or_the_destination():
    ok = ftj("Succeeded", output={"path": "pvc://outputs/tiny/model", "files": 6, "bytes": 600000},
             progress={"loss": 1.5, "step": 30})
    result = result_of(ok)
    assert (result.path, result.files, result.loss, result.steps) == ("pvc://outputs/tiny/model", 6, 1.5, 30)
    assert result_of(ftj("Succeeded")).path == "pvc://outputs/tiny/model"
    assert result_of(ftj("Running")).path is None


def test_status_lists_each_attempt_as_the_operator_counted_it():
    """`kubesloth status` shows status.attempts: which pod ended how, also after the pods are gone."""
    attempts = {"jobUid": "j1", "before": "2026-12-01T11:00:00Z", "earlierInterruptions": 2,
                "pods": [{"name": "tiny-trainer-a", "created": "2026-12-01T11:10:00Z", "ran": True,
                          "ended": "Interruption", "reason": "PodDeleted"},
                         {"name": "tiny-trainer-b", "created": "2026-12-01T11:20:00Z", "ran": True,
                          "ended": "Failure", "reason": "OutOfMemory"},
                         {"name": "tiny-trainer-c", "created": "2026-12-01T11:30:00Z", "ran": True}]}
    text = describe(ftj("Running", interruptions=3, failures=1, attempts=attempts), now=NOW)
    lines = text.splitlines()
    at = lines.index("Attempts:    failures 1, interruptions 3")
    assert lines[at + 1].split() == ["POD", "COUNTED", "REASON", "CREATED"]
    assert lines[at + 2].split() == ["tiny-trainer-a", "Interruption", "PodDeleted", "2026-12-01T11:10:00Z"]
    assert lines[at + 3].split() == ["tiny-trainer-b", "Failure", "OutOfMemory", "2026-12-01T11:20:00Z"]
    assert lines[at + 4].split() == ["tiny-trainer-c", "running", "2026-12-01T11:30:00Z"]
    assert lines[at + 5] == "  and, of pods created before 2026-12-01T11:00:00Z: 2 interruptions"
    assert "POD" not in describe(ftj("Running"), now=NOW)  # nothing recorded: no table


def test_the_notebook_builder_validates_and_keeps_the_spec_as_written():
    job = FineTuneJob("tiny", "ml", model={"source": "pvc://models/tiny"}, dataset={"source": "pvc://data/x.jsonl"},
                      training={"max_steps": 4}, output={"destination": "pvc://outputs/tiny"})
    body = job.to_dict()
    assert body["metadata"] == {"name": "tiny", "namespace": "ml"}
    assert body["spec"]["training"]["maxSteps"] == 4
    with pytest.raises(ValidationError):
        FineTuneJob("bad", model={"source": "nowhere"}, dataset={"source": "pvc://d/x"},
                    output={"destination": "pvc://o/x"})
    example = FineTuneJob.from_yaml(REPO_ROOT / "examples" / "finetunejob-tiny.yaml")
    assert example.name == "tiny-alpaca" and "status" not in example.to_dict()
    assert "seed" in example.to_dict()["spec"]["training"] and "epochs" not in example.to_dict()["spec"]["training"]


def test_arguments_parse_as_users_expect():
    parser = cli.build_parser()
    args = parser.parse_args(["get", "-n", "ml", "--context", "prod"])
    assert (args.namespace, args.context, args.func) == ("ml", "prod", cli.cmd_get)
    args = parser.parse_args(["-n", "ml", "logs", "tiny", "-f"])
    assert (args.namespace, args.follow, args.local) == ("ml", True, None)
    assert parser.parse_args(["logs", "tiny", "--api"]).local is False
    assert parser.parse_args(["wait", "tiny", "--for", "Running", "--timeout", "5"]).for_phase == "Running"
    # the existing commands are untouched
    assert parser.parse_args(["crd", "--write"]).func == cli.cmd_crd
    assert parser.parse_args(["plan", "x.yaml", "--offline"]).func == cli.cmd_plan
    assert parser.parse_args(["dev", "cluster", "up"]).func == cli.cmd_cluster
    with pytest.raises(SystemExit) as version:
        cli.build_parser("kubectl sloth").parse_args(["--version"])
    assert version.value.code == 0


def test_submit_refuses_an_invalid_file_before_any_cluster(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({"apiVersion": "kubesloth.io/v1alpha1", "kind": "FineTuneJob",
                               "metadata": {"name": "bad"}, "spec": {"model": {"source": "x"}}}))
    assert cli.main(["submit", str(bad), "--kubeconfig", str(tmp_path / "none")]) == Exit.USAGE
    assert "not a valid FineTuneJob" in capsys.readouterr().err
    assert cli.main(["submit", str(tmp_path / "missing.yaml")]) == Exit.USAGE


def test_no_kubeconfig_is_an_api_error(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert cli.main(["get", "--kubeconfig", str(tmp_path / "none")]) == Exit.API
    assert "no usable kubeconfig" in capsys.readouterr().err
