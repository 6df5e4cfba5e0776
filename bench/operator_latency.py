"""Operator latency: `kubectl apply -f ftj.yaml` -> the trainer Job exists, p50/p95 over N FineTuneJobs.

Runs on the local control plane (its own, in a temporary state dir) with the real operator (`kubesloth operator`, a
kopf subprocess). No node agent: the pods stay Pending, which does not matter for Job creation. Each sample is the
wall time from starting `kubectl apply` (kubectl's own start-up included, as a user would see it) to the moment a
watch on Jobs, opened before the apply, sees the Job; `after_apply` is the part after kubectl returned.

    .venv/bin/python bench/operator_latency.py --jobs 30
Results go to docs/benchmarks.md ("Operator" section) by hand, with the date, command and machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    index = max(0, min(len(ordered) - 1, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


def ftj(name: str, namespace: str) -> dict:
    return {"apiVersion": "kubesloth.io/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"model": {"source": "pvc://models/tiny-llama"},
                     "dataset": {"source": "pvc://data/alpaca-tiny.jsonl"},
                     "training": {"maxSteps": 1},
                     "output": {"destination": f"pvc://outputs/{name}"}}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=30, help="FineTuneJobs to apply (>= 20 for a p95)")
    parser.add_argument("--gap", type=float, default=0.3, help="seconds between applies")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")

    from kubesloth.local.cluster import LocalCluster

    state = Path(tempfile.mkdtemp(prefix="kubesloth-bench-"))
    cluster = LocalCluster(state / "cluster").up()
    env = cluster.env()
    os.environ["KUBECONFIG"] = str(cluster.kubeconfig)  # before the kubernetes package reads it
    operator = None
    try:
        subprocess.run(["kubectl", "apply", "-f", str(REPO_ROOT / "crds" / "kubesloth.io_finetunejobs.yaml")],
                       env=env, check=True, capture_output=True)
        subprocess.run(["kubectl", "wait", "--for=condition=Established", "--timeout=60s",
                        "crd/finetunejobs.kubesloth.io"], env=env, check=True, capture_output=True)
        namespace = "bench"
        subprocess.run(["kubectl", "create", "namespace", namespace], env=env, check=True, capture_output=True)
        with open(state / "operator.log", "wb") as log:
            operator = subprocess.Popen([sys.executable, "-m", "kubesloth.cli", "operator"], cwd=REPO_ROOT,
                                        env={**env, "KUBESLOTH_OPERATOR_PROMETHEUS_PORT": "0"}, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)

        import urllib3
        from kubernetes import client, config, watch

        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        config.load_kube_config()
        batch = client.BatchV1Api()
        seen: "queue.Queue[tuple[str, float]]" = queue.Queue()
        ready = threading.Event()

        def watch_jobs() -> None:
            stream = watch.Watch().stream(batch.list_namespaced_job, namespace, timeout_seconds=3600,
                                          _preload_content=False)
            ready.set()
            try:
                for event in stream:
                    if event["type"] == "ADDED":
                        seen.put((event["raw_object"]["metadata"]["name"], time.perf_counter()))
            except Exception:  # the control plane stopping at the end ends the watch
                return

        threading.Thread(target=watch_jobs, daemon=True).start()
        ready.wait(10)

        # Warm-up: the operator is up and handling once the first Job appears.
        warm_deadline = time.monotonic() + 60
        subprocess.run(["kubectl", "apply", "-f", "-"], input=json.dumps(ftj("warmup", namespace)), text=True,
                       env=env, check=True, capture_output=True)
        while time.monotonic() < warm_deadline:
            try:
                if seen.get(timeout=1)[0] == "warmup-trainer":
                    break
            except queue.Empty:
                continue
        else:
            raise SystemExit("the operator never created the warm-up Job; see " + str(state / "operator.log"))

        totals, after_apply = [], []
        for i in range(args.jobs):
            name = f"lat-{i:03d}"
            start = time.perf_counter()
            subprocess.run(["kubectl", "apply", "-f", "-"], input=json.dumps(ftj(name, namespace)), text=True,
                           env=env, check=True, capture_output=True)
            applied = time.perf_counter()
            while True:
                job, at = seen.get(timeout=30)
                if job == f"{name}-trainer":
                    break
            totals.append(at - start)
            after_apply.append(at - applied)
            time.sleep(args.gap)

        result = {
            "jobs": args.jobs,
            "p50_s": round(statistics.median(totals), 3), "p95_s": round(percentile(totals, 95), 3),
            "max_s": round(max(totals), 3),
            "after_apply_p50_s": round(statistics.median(after_apply), 3),
            "after_apply_p95_s": round(percentile(after_apply, 95), 3),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }
        if args.json:
            print(json.dumps(result))
        else:
            print(f"kubectl apply -> Job created, {result['jobs']} FineTuneJobs: p50 {result['p50_s']} s, "
                  f"p95 {result['p95_s']} s, max {result['max_s']} s "
                  f"(after kubectl returned: p50 {result['after_apply_p50_s']} s, p95 {result['after_apply_p95_s']} s)")
            print(f"{result['date']}; {result['machine']}")
        return 0
    finally:
        if operator is not None:
            operator.terminate()
            try:
                operator.wait(15)
            except subprocess.TimeoutExpired:
                operator.kill()
        cluster.down()


if __name__ == "__main__":
    raise SystemExit(main())
