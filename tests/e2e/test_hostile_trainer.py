"""A hostile trainer end to end: its /metrics drips a byte a second, or claims step 1e308. The real operator
(kopf subprocess, resync every 2 s), the real node agent, tests/e2e/hostile_trainer.py as the trainer command.

Before bounded, off-reconcile scraping the dripping pod held the one resync thread for as long as it dripped: no
progress, TTL or status update for any FineTuneJob; and step 1e308 made every status patch of its job fail, so it
stayed Pending while its pod ran.
"""

from __future__ import annotations

import shlex

import pytest

from kubesloth.local.cluster import REPO_ROOT

from .stack import Stack, finetunejob, wait_for

HOSTILE = shlex.join(["python", "-c", (REPO_ROOT / "tests" / "e2e" / "hostile_trainer.py").read_text()])


@pytest.fixture(scope="module")
def stack(cluster, tmp_path_factory):
    stack = Stack(cluster, tmp_path_factory.mktemp("hostile"), {"KUBESLOTH_OPERATOR_TRAINER_COMMAND": HOSTILE},
                  gpus=3)  # one per job: all three run at once
    for claim in ("models", "data", "outputs"):  # the stand-in reads neither model nor data
        (stack.volumes / claim).mkdir(parents=True)
    stack.start()
    yield stack
    stack.stop()


def scrapes(stack, name: str) -> int:
    path = stack.volumes / "outputs" / name / "scrapes.txt"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_a_dripping_trainer_delays_no_other_finetunejob(stack, k8s):
    # "a-" sorts first: the resync reconciles the dripping job before the others in every round.
    dripping, steady, huge = "a-drip", "b-steady", "c-huge-step"
    for name in (dripping, steady, huge):
        # Three at once on the local node (2 CPUs here): kube-scheduler fits their CPU requests, so each asks
        # for a little of the stand-in's real need.
        k8s.apply(finetunejob(name, training={"maxSteps": 3600}, resources={"cpu": "250m", "memory": "1Gi"}))
    wait_for("the operator scraping the dripping trainer", lambda: scrapes(stack, dripping), timeout=60)

    # While it drips, the steady job's progress keeps moving: a new reading at (about) every resync.
    seen = []

    def steady_moved_three_times():
        progress = k8s.status(steady).get("progress") or {}
        if progress.get("updatedAt") and progress not in seen:
            seen.append(progress)
        return len({p["step"] for p in seen}) >= 4

    try:
        wait_for("the steady job's progress to move 3 times", steady_moved_three_times, timeout=30, every=0.5)
    except AssertionError:
        raise AssertionError(f"progress seen: {seen}\n{stack.logs()}") from None
    steps = [p["step"] for p in seen]
    assert steps == sorted(steps) and all(p["totalSteps"] == 3600 for p in seen)
    assert k8s.phase(dripping) == "Running" and "progress" not in k8s.status(dripping)
    assert scrapes(stack, dripping) >= 2  # each scrape cut off at its deadline, the next started later

    # Step 1e308 is left out of status; the phase and the values that fit are written.
    wait_for("the huge-step job's progress", lambda: (k8s.status(huge).get("progress") or {}).get("totalSteps"),
             timeout=30)
    status = k8s.status(huge)
    assert status["phase"] == "Running" and "step" not in status["progress"]
    assert "c-huge-step: status.progress.step = " in stack.operator.log_path.read_text()
