"""The chart's alert rules, checked and unit-tested by Debian's promtool (2.42)."""

from __future__ import annotations

from pathlib import Path

import yaml

from .conftest import ALERTS_DIR
from .helpers import run_promtool

RULE_TESTS = Path(__file__).parent / "kubesloth.rules.test.yaml"


def alert_names() -> set[str]:
    names = set()
    for path in sorted(ALERTS_DIR.glob("*.yaml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            names |= {rule["alert"] for rule in group["rules"] if "alert" in rule}
    return names


def test_rule_files_pass_promtool_check_rules(promtool):
    files = sorted(str(p) for p in ALERTS_DIR.glob("*.yaml"))
    assert files, f"no rule files in {ALERTS_DIR}"
    proc = run_promtool(promtool, "check", "rules", *files)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_rule_unit_tests_pass(promtool):
    proc = run_promtool(promtool, "test", "rules", str(RULE_TESTS), cwd=RULE_TESTS.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_has_a_firing_and_a_quiet_case():
    fires, quiet = set(), set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    expected = {"KubeslothFineTuneJobFailed", "KubeslothTrainerOutOfMemory", "KubeslothFineTuneJobStalled",
                "KubeslothFineTuneJobThroughputDropped", "KubeslothOperatorDown"}
    assert alert_names() == expected
    assert fires == expected, f"alerts never shown firing: {expected - fires}"
    assert quiet == expected, f"alerts never shown staying quiet: {expected - quiet}"


def test_alerts_use_only_metrics_the_operator_exports():
    """The alerts are built on the operator's endpoint (a ServiceMonitor is enough): every kubesloth_* name they
    query is in the operator registry's exposition."""
    import re

    from kubesloth.operator import metrics as m

    operator = m.OperatorMetrics()
    operator.observe_job("ml", "llama", {"phase": "Running", "progress": {"step": 1, "totalSteps": 2,
                                                                          "tokensPerSecond": 1.0}})
    operator.observe_job("ml", "bad", {"phase": "Failed"})
    operator.observe_failed_pods("ml", [("uid", "OutOfMemory", None)])
    exported = set(re.findall(r"^(kubesloth_\w+)", operator.exposition(), re.M))
    used = set()
    for path in ALERTS_DIR.glob("*.yaml"):
        used |= set(re.findall(r"\b(kubesloth_\w+)", path.read_text()))
    assert used and used <= exported, f"not exported by the operator: {used - exported}"
