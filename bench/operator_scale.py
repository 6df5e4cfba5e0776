"""Operator at scale: RSS idle / at N FineTuneJobs / after deleting them all, one full resync pass of N, and
create -> Job p95 in a burst.

Runs its own local control plane (a temporary state dir: etcd + kube-apiserver + kube-controller-manager v1.20.2)
and the real operator (`kubesloth operator`, a kopf subprocess, default settings: resync every 10 s). No node agent
(the kube-scheduler, from 2e3edcf, marks each pod Unschedulable): the controller-manager creates each Job's pod
and it stays Pending (never bound, nothing runs), so
the operator holds and watches the full set of children (FineTuneJob, ConfigMap, Job, Pod) of every FineTuneJob
at almost no cost to the machine. Steps:

  1. idle: the operator up (one warm-up FineTuneJob created and deleted), RSS after two resync periods;
  2. burst: `--burst` FineTuneJobs created at once (8 client threads), each timed from just before its create
     request to the moment a watch on Jobs (opened before) sees its trainer Job: p50/p95/max;
  3. scale: created up to `--jobs` in batches, every one with its Job and a status phase; then RSS sampled over
     three resync periods, the operator's CPU over the same time, and the resync passes' duration from its
     metrics (kubesloth_resync_duration_seconds, the passes made while all N existed);
  4. deleted: every FineTuneJob deleted (children by garbage collection); RSS once the children are gone and two
     resync periods passed.

    .venv/bin/python bench/operator_scale.py --jobs 1000 --burst 200

The operator runs on the memory allocator its image sets (`--allocator image`, the default: the Dockerfile's
operator stage's LD_PRELOAD / PYTHONMALLOC / MALLOC_CONF, i.e. jemalloc: Debian's libjemalloc2 must be installed
here, and the bench checks the operator process really mapped it); `--allocator python` runs it on CPython's own.
Results go to docs/benchmarks.md ("Operator" section) by hand, with the date, command and machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
from bench.operator_latency import ftj, percentile  # noqa: E402  (same FineTuneJob, same percentile)

GROUP, VERSION, PLURAL = "kubesloth.io", "v1alpha1", "finetunejobs"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def smaps_rss(text: str) -> dict[str, float]:
    """RSS in MiB by kind of mapping: [heap] (glibc's main arena), anonymous 64 MiB-aligned glibc thread arenas
    and CPython's 1 MiB arenas alike ("anon"), [stack], shared libraries and other files ("files")."""
    kinds: dict[str, float] = {}
    kind = "anon"
    for line in text.splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
            name = fields[5] if len(fields) > 5 else ""
            kind = name if name.startswith("[") else ("files" if name else "anon")
        elif fields and fields[0] == "Rss:":
            kinds[kind] = kinds.get(kind, 0.0) + int(fields[1]) / 1024
    return {k: round(v, 1) for k, v in sorted(kinds.items())}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values = {}
    for line in text.splitlines():
        match = re.match(r"^(kubesloth_(?:resync|operator_reads)\S*)\s+(\S+)$", line)
        if match:
            values[match.group(1)] = float(match.group(2))
    return values


def wait(what: str, probe, timeout: float, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(every)
    raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")


ALLOCATOR_ENV = ("LD_PRELOAD", "PYTHONMALLOC", "MALLOC_CONF")


def image_allocator_env(dockerfile: Path = REPO_ROOT / "Dockerfile") -> dict[str, str]:
    """The allocator settings of the Dockerfile's `operator` stage (its ENV instructions), so the bench measures
    the operator as its image runs it."""
    text = re.sub(r"\\\n\s*", " ", dockerfile.read_text())
    stage = re.split(r"^FROM\s+\S+\s+AS\s+operator\s*$", text, flags=re.MULTILINE | re.IGNORECASE)[1]
    stage = re.split(r"^FROM\s", stage, flags=re.MULTILINE | re.IGNORECASE)[0]
    env: dict[str, str] = {}
    for line in stage.splitlines():
        if line.strip().upper().startswith("ENV "):
            env.update(item.split("=", 1) for item in line.split()[1:] if "=" in item)
    return {name: env[name] for name in ALLOCATOR_ENV if name in env}


def mapped_allocator(pid: int) -> str:
    """What allocator library the process mapped: "jemalloc" or "libc"."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return "jemalloc" if "libjemalloc" in maps else "libc"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000, help="FineTuneJobs at the peak")
    parser.add_argument("--burst", type=int, default=200, help="FineTuneJobs created at once, timed")
    parser.add_argument("--resync", type=float, default=10.0, help="the operator's resync period (its default)")
    parser.add_argument("--crd", default=str(REPO_ROOT / "crds" / "kubesloth.io_finetunejobs.yaml"))
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--tracemalloc", metavar="DIR", help="diagnosis: run the operator with tracemalloc "
                        "(KUBESLOTH_OPERATOR_TRACEMALLOC) and dump its top allocations to DIR at idle, at N and "
                        "after deletion (slower, more memory: not for the recorded figures)")
    parser.add_argument("--tracemalloc-frames", type=int, default=1, help="frames per traced allocation with "
                        "--tracemalloc (0: no tracing, only RSS, glibc's and CPython's allocator statistics)")
    parser.add_argument("--allocator", choices=("image", "python"), default="image",
                        help="image: the Dockerfile operator stage's allocator environment (jemalloc); python: "
                        "CPython's own allocator (no LD_PRELOAD/PYTHONMALLOC/MALLOC_CONF)")
    parser.add_argument("--operator-env", action="append", default=[], metavar="NAME=VALUE",
                        help="diagnosis: extra environment for the operator (e.g. MALLOC_ARENA_MAX=1)")
    parser.add_argument("--smaps", metavar="DIR", help="diagnosis: save the operator's /proc/PID/smaps at idle, "
                        "at N and after deletion to DIR, and report RSS by kind of mapping")
    parser.add_argument("--settle", type=float, default=0.0, metavar="S", help="diagnosis: read RSS after "
                        "deletion once more, S seconds later")
    parser.add_argument("--py-spy", metavar="FILE", help="diagnosis: record the operator with py-spy (on PATH) "
                        "during the burst, a speedscope profile to FILE")
    args = parser.parse_args(argv)
    if not 1 <= args.burst <= args.jobs:
        parser.error("need 1 <= --burst <= --jobs")

    from kubesloth.local.cluster import LocalCluster

    state = Path(tempfile.mkdtemp(prefix="kubesloth-scale-"))
    cluster = LocalCluster(state / "cluster").up()
    env = cluster.env()
    os.environ["KUBECONFIG"] = str(cluster.kubeconfig)
    operator = None
    port = free_port()
    result: dict = {"jobs": args.jobs, "burst": args.burst, "resync_period_s": args.resync}
    try:
        subprocess.run(["kubectl", "apply", "-f", args.crd],
                       env=env, check=True, capture_output=True)
        for attempt in range(5):  # right after the apply the CRD may not be there yet: "not found"
            established = subprocess.run(["kubectl", "wait", "--for=condition=Established", "--timeout=60s",
                                          "crd/finetunejobs.kubesloth.io"], env=env, capture_output=True)
            if established.returncode == 0:
                break
            time.sleep(2)
        else:
            raise SystemExit(f"the CRD is not established: {established.stderr.decode()}")
        namespace = "scale"
        subprocess.run(["kubectl", "create", "namespace", namespace], env=env, check=True, capture_output=True)
        log_path = state / "operator.log"
        debug_env = {}
        if args.tracemalloc:
            Path(args.tracemalloc).mkdir(parents=True, exist_ok=True)
            debug_env["KUBESLOTH_OPERATOR_TRACEMALLOC"] = str(Path(args.tracemalloc).resolve() / "operator")
            debug_env["KUBESLOTH_OPERATOR_TRACEMALLOC_FRAMES"] = str(args.tracemalloc_frames)
        if args.allocator == "image":
            debug_env.update(image_allocator_env())
        debug_env.update(item.split("=", 1) for item in args.operator_env)
        if debug_env:
            result["operator_env"] = debug_env
        with open(log_path, "wb") as log:
            operator = subprocess.Popen(
                [sys.executable, "-m", "kubesloth.cli", "operator"], cwd=REPO_ROOT, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
                env={**env, "KUBESLOTH_OPERATOR_PROMETHEUS_PORT": str(port),
                     "KUBESLOTH_OPERATOR_PROMETHEUS_ADDR": "127.0.0.1",
                     "KUBESLOTH_OPERATOR_RESYNC_SECONDS": str(args.resync),
                     "KUBESLOTH_OPERATOR_HUB_CONFIGS": "false", **debug_env})
        print(f"[scale] operator pid {operator.pid}, log {log_path}", file=sys.stderr, flush=True)
        time.sleep(1)
        result["allocator"] = mapped_allocator(operator.pid)
        if "jemalloc" in debug_env.get("LD_PRELOAD", "") and result["allocator"] != "jemalloc":
            raise SystemExit("the operator did not load jemalloc (LD_PRELOAD=" + debug_env["LD_PRELOAD"] + "): "
                             "apt-get install libjemalloc2, or --allocator python")

        dumped = [0]

        def memory_dump(step: str) -> None:
            if args.tracemalloc:
                dumped[0] += 1
                os.kill(operator.pid, signal.SIGUSR1)
                done = Path(debug_env["KUBESLOTH_OPERATOR_TRACEMALLOC"] + f".{dumped[0]}.done")
                wait(f"the operator's dump {dumped[0]}", done.exists, 300)
            if args.smaps:
                Path(args.smaps).mkdir(parents=True, exist_ok=True)
                text = Path(f"/proc/{operator.pid}/smaps").read_text()
                (Path(args.smaps) / f"{dumped[0] if args.tracemalloc else step.replace(' ', '-')}.smaps"
                 ).write_text(text)
                result.setdefault("rss_by_mapping_mib", {})[step] = smaps_rss(text)
            print(f"[scale] {step}: RSS {rss_mib(operator.pid):.1f} MiB", file=sys.stderr, flush=True)

        import urllib3
        from kubernetes import client, config, watch

        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        config.load_kube_config()
        configuration = client.Configuration.get_default_copy()
        configuration.connection_pool_maxsize = 16
        api_client = client.ApiClient(configuration)
        custom, batch, core = (client.CustomObjectsApi(api_client), client.BatchV1Api(api_client),
                               client.CoreV1Api(api_client))
        seen: dict[str, float] = {}
        arrived: "queue.Queue[str]" = queue.Queue()
        ready = threading.Event()

        def watch_jobs() -> None:
            stream = watch.Watch().stream(batch.list_namespaced_job, namespace, timeout_seconds=7200,
                                          _preload_content=False)
            ready.set()
            try:
                for event in stream:
                    if event["type"] == "ADDED":
                        name = event["raw_object"]["metadata"]["name"]
                        seen.setdefault(name, time.perf_counter())
                        arrived.put(name)
            except Exception:  # the control plane stopping at the end ends the watch
                return

        threading.Thread(target=watch_jobs, daemon=True).start()
        ready.wait(10)

        def create(name: str) -> float:
            start = time.perf_counter()
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, ftj(name, namespace),
                                                   _preload_content=False)
            return start

        def count(kind: str) -> int:
            if kind == "jobs":
                items = json.loads(batch.list_namespaced_job(namespace, _preload_content=False).data)["items"]
            elif kind == "pods":
                items = json.loads(core.list_namespaced_pod(namespace, _preload_content=False).data)["items"]
            else:
                items = json.loads(custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL,
                                                                        _preload_content=False).data)["items"]
                if kind == "phased":
                    items = [i for i in items if (i.get("status") or {}).get("phase")]
            return len(items)

        # 1. idle
        create("warmup")
        wait("the warm-up Job", lambda: "warmup-trainer" in seen, 600 if args.tracemalloc else 120)  # tracing: slow start
        custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "warmup")
        wait("the warm-up's children to go", lambda: count("jobs") == 0 and count("pods") == 0, 120)
        time.sleep(2 * args.resync)
        result["rss_idle_mib"] = round(rss_mib(operator.pid), 1)
        memory_dump("idle")

        # RSS every half second from here on: the peak, and where it was reached.
        peak = {"mib": 0.0, "step": "burst"}

        def sample_rss() -> None:
            while operator.poll() is None:
                peak["mib"] = max(peak["mib"], rss_mib(operator.pid))
                time.sleep(0.5)

        threading.Thread(target=sample_rss, daemon=True).start()

        # 2. burst
        names = [f"s-{i:04d}" for i in range(args.jobs)]
        spy = None
        if args.py_spy:
            spy = subprocess.Popen(["py-spy", "record", "-p", str(operator.pid), "-o", args.py_spy, "-f",
                                    "speedscope", "-r", "50", "--nonblocking"], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
            time.sleep(2)
        with ThreadPoolExecutor(8) as pool:
            starts = dict(zip(names[:args.burst], pool.map(create, names[:args.burst])))
        wait("the burst's Jobs", lambda: all(f"{n}-trainer" in seen for n in starts), 300)
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
        latencies = [seen[f"{n}-trainer"] - at for n, at in starts.items()]
        result["rss_after_burst_mib"] = round(rss_mib(operator.pid), 1)
        result["rss_peak_in_burst_mib"] = round(peak["mib"], 1)
        result.update(burst_p50_s=round(statistics.median(latencies), 3),
                      burst_p95_s=round(percentile(latencies, 95), 3), burst_max_s=round(max(latencies), 3))

        # 3. scale
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(create, names[args.burst:]))
        wait(f"{args.jobs} Jobs", lambda: count("jobs") == args.jobs, 1200, every=3)
        wait(f"{args.jobs} pods", lambda: count("pods") == args.jobs, 1200, every=3)
        wait(f"{args.jobs} phases", lambda: count("phased") == args.jobs, 600, every=3)
        time.sleep(args.resync)  # the first pass that sees them all
        before, cpu_before, t_before = scrape(port), cpu_seconds(operator.pid), time.monotonic()
        samples = []
        for _ in range(6):
            time.sleep(args.resync / 2)
            samples.append(rss_mib(operator.pid))
        after, cpu_after, t_after = scrape(port), cpu_seconds(operator.pid), time.monotonic()
        passes = after["kubesloth_resync_duration_seconds_count"] - before["kubesloth_resync_duration_seconds_count"]
        spent = after["kubesloth_resync_duration_seconds_sum"] - before["kubesloth_resync_duration_seconds_sum"]
        reads = {k.split("{", 1)[1].rstrip("}"): int(after[k] - before.get(k, 0))
                 for k in after if k.startswith("kubesloth_operator_reads_total{") and after[k] - before.get(k, 0)}
        memory_dump(f"at {args.jobs}")
        result["rss_peak_mib"] = round(peak["mib"], 1)
        result.update(rss_at_n_mib=round(max(samples), 1), rss_at_n_last_mib=round(samples[-1], 1),
                      resync_passes=int(passes), resync_mean_s=round(spent / passes, 2) if passes else None,
                      resync_objects=int(after.get("kubesloth_resync_finetunejobs", 0)),
                      cpu_percent_at_n=round(100 * (cpu_after - cpu_before) / (t_after - t_before), 1),
                      reads_during_passes=reads)

        # 4. deleted
        custom.delete_collection_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
        wait("the FineTuneJobs to go", lambda: count("ftjs") == 0, 600, every=3)
        wait("the children to go", lambda: count("jobs") == 0 and count("pods") == 0, 1200, every=5)
        time.sleep(2 * args.resync)
        result["rss_after_delete_mib"] = round(rss_mib(operator.pid), 1)
        memory_dump("after deletion")
        result["rss_after_delete_vs_idle_pct"] = round(100 * (result["rss_after_delete_mib"] /
                                                              result["rss_idle_mib"] - 1), 1)
        if args.settle:  # the same reading later: what the watches' and kopf's reconnections (every 300 s) free
            time.sleep(args.settle)
            result["rss_after_delete_late_mib"] = round(rss_mib(operator.pid), 1)
            result["rss_after_delete_late_s"] = args.settle
            memory_dump(f"after deletion + {args.settle:g} s")
        tracebacks = log_path.read_text(errors="replace").count("Traceback")
        result.update(operator_log_tracebacks=tracebacks,
                      machine=f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
                      date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), log=str(log_path))
        print(json.dumps(result) if args.json else json.dumps(result, indent=1))
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
