"""FineTuneJobs from Python: the layer under `kubesloth submit|status|logs|wait|get` and a notebook's API.

    from kubesloth.client import FineTuneJob
    job = FineTuneJob.from_yaml("examples/finetunejob-tiny.yaml")        # or FineTuneJob("name", model=..., ...)
    job.submit()                     # server-side apply (field manager "kubesloth")
    job.wait()                       # until Succeeded/Failed (JobFailed raised on Failed; timeout= in seconds)
    job.status()                     # the status as the API server holds it (a dict, camelCase)
    job.result()                     # Result(path, files, bytes, loss, steps, ...) of a Succeeded run

Talks to the API server with the kubernetes client (the `operator` extra) and the usual kubeconfig: $KUBECONFIG or
~/.kube/config, a context, a namespace (the context's, else "default"); in a pod, the service account.
Objects are plain dicts in wire form (camelCase), as the API server sends them. No torch here
(tests/test_layers.py).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

from kubesloth.api import contract
from kubesloth.api.v1alpha1 import (API_VERSION, FINISHED_PHASES, GROUP, KIND, PLURAL, PRINTER_COLUMNS, VERSION,
                                    FineTuneJobSpec)
from kubesloth.api.v1alpha1 import FineTuneJob as FineTuneJobType

FIELD_MANAGER = "kubesloth"
TRAINER_CONTAINER = "trainer"
LABEL_FTJ = "kubesloth.io/finetunejob"
ANNOTATION_FTJ = "kubesloth.io/finetunejob"
POD_LOG_DIR_ANNOTATION = "kubesloth.io/pod-log-dir"  # kubesloth.local.nodeagent sets it on its Node

# Pending with one of these reasons (condition Running, or Fits=False): the operator refused the spec and created
# nothing; it stays so until the spec (or the cluster) changes.
REFUSED_REASONS = frozenset({"InvalidSpec", "NameConflict", "ImageNotAllowed", "JobRefused", "ConfigMapRefused",
                             "DoesNotFit", "GpuUnsupported", "ModelConfigUnusable"})


class Exit:
    """The CLI's exit codes (docs/cli.md)."""

    SUCCEEDED = 0
    FAILED = 1  # the run ended Failed
    USAGE = 2  # bad arguments or an invalid FineTuneJob file (argparse's own code)
    REFUSED = 3  # the operator refused the spec: nothing runs until it changes
    API = 4  # not found, forbidden, unreachable
    TIMEOUT = 124  # --timeout passed (timeout(1)'s code)
    INTERRUPTED = 130  # Ctrl-C: the run goes on in the cluster


class ClientError(Exception):
    """Something the user should read; `code` is the CLI's exit code."""

    def __init__(self, message: str, code: int = Exit.API):
        super().__init__(message)
        self.code = code


class JobFailed(ClientError):
    def __init__(self, outcome: "Outcome"):
        super().__init__(outcome.describe(), outcome.code)
        self.outcome = outcome


class WaitTimeout(ClientError):
    def __init__(self, message: str):
        super().__init__(message, Exit.TIMEOUT)


# --- reading a FineTuneJob -----------------------------------------------------------------------------------------
def condition(ftj: Mapping[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in ((ftj.get("status") or {}).get("conditions") or []) if c.get("type") == kind), None)


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def human_duration(seconds: float | None) -> str | None:
    from kubesloth.operator.progress import human_duration as fmt  # one format for status.progress.eta and here

    return fmt(seconds)


@dataclass
class Outcome:
    """Where a FineTuneJob stands for someone waiting on it: finished, refused, or still going (`code` None)."""

    phase: str | None
    reason: str | None
    message: str | None
    code: int | None

    @property
    def done(self) -> bool:
        return self.code is not None

    def describe(self) -> str:
        what = {Exit.REFUSED: "Refused"}.get(self.code, self.phase or "Pending")
        detail = ": ".join(x for x in (self.reason, self.message) if x)
        return f"{what}: {detail}" if detail else what


def outcome(ftj: Mapping[str, Any]) -> Outcome:
    """Succeeded -> 0, Failed -> 1 (the Failed condition's reason and message), refused (the operator acted on
    this generation and created nothing) -> 3, else not done."""
    status = ftj.get("status") or {}
    phase = status.get("phase")
    running = condition(ftj, "Running") or {}
    if phase == "Succeeded":
        return Outcome(phase, (condition(ftj, "Succeeded") or {}).get("reason"), status.get("message"),
                       Exit.SUCCEEDED)
    if phase == "Failed":
        failed = condition(ftj, "Failed") or {}
        return Outcome(phase, failed.get("reason"), failed.get("message") or status.get("message"), Exit.FAILED)
    current = status.get("observedGeneration") == (ftj.get("metadata") or {}).get("generation")
    fits = condition(ftj, "Fits") or {}
    if phase == "Pending" and current:
        if fits.get("status") == "False" and fits.get("reason") in REFUSED_REASONS:
            return Outcome(phase, fits.get("reason"), status.get("message") or fits.get("message"), Exit.REFUSED)
        if running.get("reason") in REFUSED_REASONS:
            return Outcome(phase, running.get("reason"), running.get("message") or status.get("message"),
                           Exit.REFUSED)
    return Outcome(phase, running.get("reason"), status.get("message"), None)


def _path(obj: Any, json_path: str) -> Any:
    """A printer column's jsonPath (`.a.b.c`, the only form PRINTER_COLUMNS uses) on a dict."""
    for part in json_path.strip(".").split("."):
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(part)
    return obj


def _cell(value: Any, kind: str, now: datetime) -> str:
    if value is None or value == "":
        return ""
    if kind == "date":
        moment = parse_time(str(value))
        return human_duration((now - moment).total_seconds()) if moment else str(value)
    if kind == "number" and isinstance(value, float):
        return f"{value:g}" if abs(value) < 1e6 else f"{value:.0f}"
    return str(value)


def table(items: list[Mapping[str, Any]], wide: bool = False, all_namespaces: bool = False,
          now: datetime | None = None) -> str:
    """`kubectl get ftj` from the CRD's own printer columns (priority 1 only with -o wide); Loss as the server
    shows a number."""
    now = now or datetime.now(timezone.utc)
    columns = [c for c in PRINTER_COLUMNS if wide or not c.get("priority")]
    header = (["NAMESPACE"] if all_namespaces else []) + ["NAME"] + [c["name"].upper() for c in columns]
    rows = [header]
    for item in items:
        meta = item.get("metadata") or {}
        rows.append(([meta.get("namespace", "")] if all_namespaces else []) + [meta.get("name", "")]
                    + [_cell(_path(item, c["jsonPath"]), c["type"], now) for c in columns])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("   ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows)


def _si(value: float | None) -> str | None:
    if value is None:
        return None
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value:.0f}"


def progress_line(ftj: Mapping[str, Any], bar_width: int = 20, now: datetime | None = None) -> str:
    """One line for a follower: `tiny Running [#####-----] 12/30 loss 1.2345 26.3k tok/s ETA 12s`."""
    status = ftj.get("status") or {}
    progress = status.get("progress") or {}
    name = (ftj.get("metadata") or {}).get("name", "")
    parts = [name, status.get("phase") or "Pending"]
    step, total = progress.get("step"), progress.get("totalSteps")
    if isinstance(step, int) and isinstance(total, int) and total > 0:
        if bar_width:
            filled = min(bar_width, round(bar_width * step / total))
            parts.append("[" + "#" * filled + "-" * (bar_width - filled) + "]")
        parts.append(f"{step}/{total}")
    elif progress.get("display"):
        parts.append(str(progress["display"]))
    loss = progress.get("loss")
    if isinstance(loss, (int, float)) and math.isfinite(loss):
        parts.append(f"loss {loss:.4f}")
    if progress.get("tokensPerSecond") is not None:
        parts.append(f"{_si(progress['tokensPerSecond'])} tok/s")
    eta = progress.get("eta") or human_duration(progress.get("etaSeconds"))
    if eta and status.get("phase") == "Running":
        parts.append(f"ETA {eta}")
    started = parse_time(status.get("startTime"))
    if started:
        end = parse_time(status.get("completionTime")) or now or datetime.now(timezone.utc)
        parts.append(f"elapsed {human_duration((end - started).total_seconds())}")
    return " ".join(parts)


def event_line(ftj: Mapping[str, Any]) -> str:
    """What changed that is not a step: the phase and the reason for it."""
    status = ftj.get("status") or {}
    phase = status.get("phase") or "Pending"
    found = outcome(ftj)
    reason = found.reason if found.reason and found.reason != phase else None
    message = status.get("message")
    return f"{phase}" + (f" ({reason})" if reason else "") + (f": {message}" if message else "")


@dataclass
class Result:
    """What a Succeeded run left: the model's path (status.output, else the destination's model/ folder)."""

    name: str
    namespace: str
    phase: str | None
    path: str | None
    files: int | None = None
    bytes: int | None = None
    loss: float | None = None
    steps: int | None = None
    tokens_per_second: float | None = None
    checkpoint: str | None = None
    duration_seconds: float | None = None
    dollars: float | None = None
    status: dict[str, Any] = field(default_factory=dict, repr=False)


def result_of(ftj: Mapping[str, Any]) -> Result:
    meta, spec, status = ftj.get("metadata") or {}, ftj.get("spec") or {}, ftj.get("status") or {}
    output, progress = status.get("output") or {}, status.get("progress") or {}
    destination = (spec.get("output") or {}).get("destination")
    path = output.get("path") or (f"{destination.rstrip('/')}/{contract.FINAL_MODEL_DIR}" if destination and
                                  status.get("phase") == "Succeeded" else None)
    started, ended = parse_time(status.get("startTime")), parse_time(status.get("completionTime"))
    return Result(name=meta.get("name", ""), namespace=meta.get("namespace", ""), phase=status.get("phase"),
                  path=path, files=output.get("files"), bytes=output.get("bytes"), loss=progress.get("loss"),
                  steps=progress.get("step"), tokens_per_second=progress.get("tokensPerSecond"),
                  checkpoint=(status.get("checkpoint") or {}).get("path"),
                  duration_seconds=(ended - started).total_seconds() if started and ended else None,
                  dollars=(status.get("cost") or {}).get("dollars"), status=dict(status))


def describe(ftj: Mapping[str, Any], now: datetime | None = None) -> str:
    """`kubesloth status NAME`: phase, conditions, progress, estimate, checkpoint and output."""
    now = now or datetime.now(timezone.utc)
    meta, spec, status = ftj.get("metadata") or {}, ftj.get("spec") or {}, ftj.get("status") or {}
    lines = [f"Name:        {meta.get('namespace', '')}/{meta.get('name', '')}",
             f"Model:       {(spec.get('model') or {}).get('source', '')}",
             f"Dataset:     {(spec.get('dataset') or {}).get('source', '')}",
             f"Phase:       {status.get('phase') or 'Pending (not seen by the operator yet)'}"]
    if status.get("message"):
        lines.append(f"Message:     {status['message']}")
    if status.get("observedGeneration") is not None and status["observedGeneration"] != meta.get("generation"):
        lines.append(f"Note:        status is of generation {status['observedGeneration']}, the spec is at "
                     f"{meta.get('generation')} (the operator has not caught up)")
    progress = status.get("progress") or {}
    if progress:
        lines.append(f"Progress:    {progress_line({'metadata': {}, 'status': status}, now=now).strip()}")
    for key, label in (("startTime", "Started"), ("completionTime", "Completed")):
        if status.get(key):
            ago = parse_time(status[key])
            lines.append(f"{label + ':':<12} {status[key]}" + (f" ({human_duration((now - ago).total_seconds())} ago)"
                                                              if ago else ""))
    counts = [f"{k} {status[k]}" for k in ("failures", "interruptions") if status.get(k)]
    if counts:
        lines.append(f"Attempts:    {', '.join(counts)}")
    lines += attempt_lines(status.get("attempts") or {})
    if status.get("podName"):
        lines.append(f"Pod:         {status['podName']}")
    estimate = status.get("estimate") or {}
    if estimate:
        bits = [f"GPU {estimate['gpuMemory']}" if estimate.get("gpuMemory") else None,
                f"of {estimate['budgetBytes'] / 2**30:.0f}Gi" if estimate.get("budgetBytes") else None,
                {True: "fits", False: "does NOT fit"}.get(estimate.get("fits")),
                f"profile {estimate['profile']}" if estimate.get("profile") else None,
                f"~{_si(estimate['tokensPerSecond'])} tok/s" if estimate.get("tokensPerSecond") else None,
                f"~{human_duration(estimate['etaSeconds'])}" if estimate.get("etaSeconds") else None,
                f"~${estimate['dollars']:.2f}" if estimate.get("dollars") is not None else None]
        lines.append(f"Estimate:    {' '.join(b for b in bits if b) or estimate.get('message', '')}")
    checkpoint = status.get("checkpoint") or {}
    if checkpoint:
        lines.append(f"Checkpoint:  step {checkpoint.get('step', '?')} at {checkpoint.get('path', '?')}")
    result = result_of(ftj)
    if result.path:
        size = ", ".join(x for x in (f"{result.files} files" if result.files is not None else None,
                                     f"{result.bytes / 2**20:.1f} MiB" if result.bytes is not None else None) if x)
        lines.append(f"Output:      {result.path}" + (f" ({size})" if size else ""))
    cost = status.get("cost") or {}
    if cost.get("dollars") is not None:
        lines.append(f"Cost:        ${cost['dollars']:.2f}")
    conditions = status.get("conditions") or []
    if conditions:
        lines += ["Conditions:", table_of([["TYPE", "STATUS", "REASON", "AGE", "MESSAGE"]] + [[
            c.get("type", ""), c.get("status", ""), c.get("reason", "") or "",
            human_duration((now - t).total_seconds()) if (t := parse_time(c.get("lastTransitionTime"))) else "",
            (c.get("message") or "")[:100]] for c in conditions], indent="  ")]
    return "\n".join(lines)


def attempt_lines(attempts: Mapping[str, Any]) -> list[str]:
    """The operator's record of the current Job's trainer pods (status.attempts), one row a pod: how its attempt
    was counted and why, so a run that came through interruptions says which pod ended how."""
    pods = attempts.get("pods") or []
    earlier = [f"{attempts[k]} {label}" for k, label in (("earlierInterruptions", "interruptions"),
                                                        ("earlierFailures", "failures")) if attempts.get(k)]
    if not pods and not earlier:
        return []
    rows = [["POD", "COUNTED", "REASON", "CREATED"]] + [[
        pod.get("name", "") or "", pod.get("ended") or ("running" if pod.get("ran") else "not started"),
        pod.get("reason", "") or "", pod.get("created", "") or ""] for pod in pods]
    out = [table_of(rows, indent="  ")] if pods else []
    if earlier:
        out.append(f"  and, of pods created before {attempts.get('before', '?')}: {', '.join(earlier)}")
    return out


def table_of(rows: list[list[str]], indent: str = "") -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(indent + "  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in rows)


# --- talking to the API server -------------------------------------------------------------------------------------
def _json(response: Any) -> Any:
    return json.loads(response.data)


class Connection:
    """An API client from a kubeconfig (file, context) or the pod's service account, and the namespace to use."""

    def __init__(self, kubeconfig: str | None = None, context: str | None = None, namespace: str | None = None):
        try:
            from kubernetes import client, config
        except ImportError as err:  # pragma: no cover - the operator extra is missing
            raise ClientError("the kubernetes client is missing: pip install 'kubesloth[operator]'") from err
        from kubernetes.config.config_exception import ConfigException

        configuration = client.Configuration()
        default_ns = None
        try:
            config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=configuration)
            contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
            chosen = next((c for c in contexts if c["name"] == (context or active["name"])), active)
            default_ns = (chosen.get("context") or {}).get("namespace")
        except (ConfigException, OSError, TypeError) as err:
            if kubeconfig or context or not os.environ.get("KUBERNETES_SERVICE_HOST"):
                raise ClientError(f"no usable kubeconfig ({err}); pass --kubeconfig or set KUBECONFIG") from err
            config.load_incluster_config(client_configuration=configuration)
            sa_ns = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
            default_ns = sa_ns.read_text().strip() if sa_ns.exists() else None
        if not configuration.verify_ssl:
            import urllib3  # a kubeconfig with insecure-skip-tls-verify (the local control plane): one warning a call

            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        self.namespace = namespace or default_ns or "default"
        self.api_client = client.ApiClient(configuration)
        self.core = client.CoreV1Api(self.api_client)
        self.custom = client.CustomObjectsApi(self.api_client)

    def _call(self, what: str, call: Callable, *args, not_found: bool = False, **kwargs) -> Any:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return _json(call(*args, _preload_content=False, **kwargs))
        except ApiException as err:
            if err.status == 404 and not_found:
                return None
            raise ClientError(f"{what}: {_api_message(err)}") from err
        except (HTTPError, OSError) as err:
            raise ClientError(f"{what}: cannot reach the API server: {err}") from err

    # FineTuneJobs
    def get(self, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        namespace = namespace or self.namespace
        return self._call(f"get finetunejob {namespace}/{name}", self.custom.get_namespaced_custom_object, GROUP,
                          VERSION, namespace, PLURAL, name, not_found=True)

    def must_get(self, name: str, namespace: str | None = None) -> dict[str, Any]:
        found = self.get(name, namespace)
        if found is None:
            raise ClientError(f'finetunejob "{name}" not found in namespace {namespace or self.namespace}')
        return found

    def list(self, all_namespaces: bool = False, namespace: str | None = None) -> list[dict[str, Any]]:
        if all_namespaces:
            body = self._call("list finetunejobs", self.custom.list_cluster_custom_object, GROUP, VERSION, PLURAL)
        else:
            body = self._call("list finetunejobs", self.custom.list_namespaced_custom_object, GROUP, VERSION,
                              namespace or self.namespace, PLURAL)
        return sorted(body.get("items") or [], key=lambda i: (i["metadata"].get("namespace", ""),
                                                              i["metadata"]["name"]))

    def apply(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Server-side apply (created if absent; the fields in `body` owned by field manager "kubesloth", taken
        over from others like `kubectl apply --server-side --force-conflicts`)."""
        meta = body["metadata"]
        namespace = meta.get("namespace") or self.namespace
        body = {**body, "metadata": {**meta, "namespace": namespace}}
        return self._call(f"apply finetunejob {namespace}/{meta['name']}",
                          self.custom.patch_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL,
                          meta["name"], body, field_manager=FIELD_MANAGER, force=True,
                          _content_type="application/apply-patch+yaml")

    def delete(self, name: str, namespace: str | None = None, wait: float = 120.0) -> None:
        """Delete (foreground: the Job and ConfigMap go first) and wait until it is gone."""
        namespace = namespace or self.namespace
        self._call(f"delete finetunejob {namespace}/{name}", self.custom.delete_namespaced_custom_object, GROUP,
                   VERSION, namespace, PLURAL, name, not_found=True, propagation_policy="Foreground")
        deadline = time.monotonic() + wait
        while self.get(name, namespace) is not None:
            if time.monotonic() > deadline:
                raise WaitTimeout(f"finetunejob {namespace}/{name} still exists {wait:.0f}s after its deletion")
            time.sleep(0.5)

    # Pods and logs
    def trainer_pods(self, name: str, namespace: str | None = None) -> list[dict[str, Any]]:
        """The FineTuneJob's trainer pods that still exist, oldest first."""
        from kubesloth.operator.builders import label_value

        namespace = namespace or self.namespace
        body = self._call("list pods", self.core.list_namespaced_pod, namespace,
                          label_selector=f"{LABEL_FTJ}={label_value(name)}")
        pods = [p for p in body.get("items") or []
                if (p["metadata"].get("annotations") or {}).get(ANNOTATION_FTJ, name) == name]
        return sorted(pods, key=lambda p: (p["metadata"].get("creationTimestamp") or "", p["metadata"]["name"]))

    def local_log_dirs(self) -> list[Path]:
        """Where local node agents keep pod logs (their Node's annotation), for a cluster without kubelets."""
        try:
            nodes = self._call("list nodes", self.core.list_node).get("items") or []
        except ClientError:  # no permission to list nodes: a real cluster's user; use the pods/log API
            return []
        dirs = [(n["metadata"].get("annotations") or {}).get(POD_LOG_DIR_ANNOTATION) for n in nodes]
        return [Path(d) for d in dirs if d]

    def node_log_dir(self, node_name: str | None) -> Path | None:
        if not node_name:
            return None
        node = self._call("get node", self.core.read_node, node_name, not_found=True)
        directory = ((node or {}).get("metadata", {}).get("annotations") or {}).get(POD_LOG_DIR_ANNOTATION)
        return Path(directory) if directory else None

    def read_log(self, pod: Mapping[str, Any]) -> str:
        meta = pod["metadata"]
        from kubernetes.client.exceptions import ApiException

        try:
            return self.core.read_namespaced_pod_log(meta["name"], meta["namespace"], container=TRAINER_CONTAINER,
                                                     _preload_content=False).data.decode(errors="replace")
        except ApiException as err:
            raise ClientError(f"log of pod {meta['name']}: {_api_message(err)}") from err

    def stream_log(self, pod: Mapping[str, Any]) -> Iterator[bytes]:
        """The pod's log through the API (kubelet), following it until the container ends."""
        meta = pod["metadata"]
        from kubernetes.client.exceptions import ApiException

        try:
            response = self.core.read_namespaced_pod_log(meta["name"], meta["namespace"],
                                                         container=TRAINER_CONTAINER, follow=True,
                                                         _preload_content=False)
        except ApiException as err:
            raise ClientError(f"log of pod {meta['name']}: {_api_message(err)}") from err
        raw = getattr(response, "response", response)
        try:
            yield from raw.stream(4096, decode_content=False)
        finally:
            raw.release_conn()


def _api_message(err: Any) -> str:
    try:
        body = json.loads(err.body)
        return f"{body.get('message') or err.reason} ({err.status})"
    except (TypeError, ValueError):
        return f"{err.reason} ({err.status})"


# --- following -----------------------------------------------------------------------------------------------------
def follow(conn: Connection, name: str, namespace: str | None = None, timeout: float | None = None,
           interval: float = 1.0, until: Callable[[dict[str, Any]], bool] | None = None,
           on_update: Callable[[dict[str, Any]], None] | None = None,
           clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep
           ) -> dict[str, Any]:
    """Poll the FineTuneJob until `until(ftj)` (default: an outcome), calling `on_update` with each reading;
    the last reading. WaitTimeout after `timeout` seconds; ClientError when it is deleted meanwhile."""
    until = until or (lambda ftj: outcome(ftj).done)
    deadline = None if timeout is None else clock() + timeout
    while True:
        ftj = conn.get(name, namespace)
        if ftj is None:
            raise ClientError(f'finetunejob "{name}" not found (deleted?) in namespace {namespace or conn.namespace}')
        if on_update:
            on_update(ftj)
        if until(ftj):
            return ftj
        if deadline is not None and clock() >= deadline:
            raise WaitTimeout(f"timed out after {timeout:g}s: {event_line(ftj)}")
        sleep(interval if deadline is None else max(0.0, min(interval, deadline - clock())))


class LogFollower:
    """The trainer's log across its pods (retries, recreated Jobs), oldest first, optionally followed to the end.

    Through the API's pods/log (a kubelet serves it) on a real cluster. The local node agent has no kubelet
    endpoint: it writes each pod's output to <pod-log-dir>/<namespace>_<pod>_<uid[:8]>/<container>.log and names
    that folder in its Node's annotation kubesloth.io/pod-log-dir; those files are read instead (they outlive
    the pod objects, so attempts whose pods are gone are shown too). `local` forces one or the other."""

    def __init__(self, conn: Connection, name: str, namespace: str | None = None, local: bool | None = None,
                 write: Callable[[str], None] | None = None, headers: bool = True, interval: float = 0.5):
        import sys

        self.conn, self.name = conn, name
        self.namespace = namespace or conn.namespace
        self.local = local
        self.write = write or (lambda text: (sys.stdout.write(text), sys.stdout.flush()))
        self.headers = headers
        self.interval = interval
        self.done: set[str] = set()

    # local files
    def _local_dirs(self) -> list[Path]:
        dirs = self.conn.local_log_dirs()
        if self.local and not dirs:
            raise ClientError("--local: no node carries the kubesloth.io/pod-log-dir annotation (is the local node "
                              "agent running?)")
        return dirs

    def _local_files(self, dirs: list[Path]) -> list[tuple[str, Path]]:
        from kubesloth.operator.builders import job_name

        prefix = f"{self.namespace}_{job_name(self.name)}-"
        found = []
        for directory in dirs:
            for pod_dir in directory.glob(f"{prefix}*"):
                log = pod_dir / f"{TRAINER_CONTAINER}.log"
                rest = pod_dir.name[len(prefix):]
                # <job>-<5 random>_<uid8>: a longer rest is another FineTuneJob whose name extends this one's
                if log.exists() and len(rest.split("_")) == 2 and len(rest.split("_")[0]) == 5:
                    found.append((pod_dir.name.split("_")[1], log))
        return sorted(found, key=lambda item: (item[1].stat().st_mtime, item[0]))

    def _use_local(self) -> list[Path] | None:
        if self.local is False:
            return None
        dirs = self._local_dirs()
        return dirs or None

    def _header(self, pod_name: str, count: int) -> None:
        if self.headers and count > 1:
            self.write(f"==> pod {pod_name} <==\n")

    def print_all(self) -> int:
        """Every attempt's log as it is now; how many pods' logs were printed."""
        dirs = self._use_local()
        if dirs is not None:
            files = self._local_files(dirs)
            for pod_name, path in files:
                self._header(pod_name, len(files))
                self.write(path.read_text(errors="replace"))
            return len(files)
        pods = self.conn.trainer_pods(self.name, self.namespace)
        for pod in pods:
            self._header(pod["metadata"]["name"], len(pods))
            self.write(self.conn.read_log(pod))
        return len(pods)

    def follow(self, timeout: float | None = None) -> None:
        """Each attempt's log in turn, the running one as it is written, until the FineTuneJob is finished (or
        refused) and the last log is drained."""
        deadline = None if timeout is None else time.monotonic() + timeout
        dirs = self._use_local()
        while True:
            finished = outcome(self.conn.must_get(self.name, self.namespace)).done
            pods = {p["metadata"]["name"]: p for p in self.conn.trainer_pods(self.name, self.namespace)}
            if dirs is not None:
                pending = [(n, path) for n, path in self._local_files(dirs) if n not in self.done]
            else:
                pending = [(n, None) for n in pods if n not in self.done]
            for pod_name, path in pending:
                pod = pods.get(pod_name)
                if path is None and not self._started(pod):
                    if finished or self._ended(pod):  # never ran: nothing to read
                        self.done.add(pod_name)
                    continue  # the API has no log until the container starts
                if self.headers and (self.done or len(pending) > 1):
                    self.write(f"==> pod {pod_name} <==\n")
                if path is not None:
                    self._tail_file(pod_name, path, deadline)
                else:
                    try:
                        for chunk in self.conn.stream_log(pod):
                            self.write(chunk.decode(errors="replace"))
                    except ClientError as err:
                        self.write(f"({err})\n")
                self.done.add(pod_name)
            if finished and all(n in self.done for n, _ in pending):
                return
            if deadline is not None and time.monotonic() > deadline:
                raise WaitTimeout(f"timed out after {timeout:g}s following the log")
            time.sleep(self.interval)

    @staticmethod
    def _started(pod: Mapping[str, Any] | None) -> bool:
        if pod is None:
            return False
        states = (pod.get("status") or {}).get("containerStatuses") or []
        return any((s.get("state") or {}).get("running") or (s.get("state") or {}).get("terminated") for s in states)

    @staticmethod
    def _ended(pod: Mapping[str, Any] | None) -> bool:
        return pod is None or (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")

    def _tail_file(self, pod_name: str, path: Path, deadline: float | None) -> None:
        """Print the file as it grows until its pod has ended (or is gone), then what is left."""
        with open(path, "rb") as handle:
            last_check = 0.0
            while True:
                chunk = handle.read(65536)
                if chunk:
                    self.write(chunk.decode(errors="replace"))
                    continue
                now = time.monotonic()
                if now - last_check >= self.interval:
                    last_check = now
                    pod = next((p for p in self.conn.trainer_pods(self.name, self.namespace)
                                if p["metadata"]["name"] == pod_name), None)
                    if self._ended(pod):
                        rest = handle.read()
                        if rest:
                            self.write(rest.decode(errors="replace"))
                        return
                if deadline is not None and now > deadline:
                    raise WaitTimeout("timed out following the log")
                time.sleep(0.1)


# --- the notebook API ----------------------------------------------------------------------------------------------
class FineTuneJob:
    """A FineTuneJob to build, submit and watch from Python.

        job = FineTuneJob("tiny", model={"source": "pvc://models/tiny-llama"},
                          dataset={"source": "pvc://data/alpaca-tiny.jsonl", "maxSamples": 64},
                          training={"maxSteps": 30}, output={"destination": "pvc://outputs/tiny"})
        job.submit().wait(timeout=600)
        print(job.result().path)

    The spec is validated by the API types (kubesloth.api.v1alpha1) when built: keyword arguments are spec fields
    (camelCase or snake_case). Connection arguments: kubeconfig, context, namespace (else the context's)."""

    def __init__(self, name: str, namespace: str | None = None, *, labels: Mapping[str, str] | None = None,
                 kubeconfig: str | None = None, context: str | None = None, connection: Connection | None = None,
                 **spec: Any):
        self.body: dict[str, Any] = {"apiVersion": API_VERSION, "kind": KIND,
                                     "metadata": {"name": name, **({"namespace": namespace} if namespace else {}),
                                                  **({"labels": dict(labels)} if labels else {})},
                                     "spec": FineTuneJobSpec.model_validate(spec).to_wire() if spec else {}}
        self._conn = connection
        self._conn_args = (kubeconfig, context, namespace)
        self.last: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, body: Mapping[str, Any], **connection: Any) -> "FineTuneJob":
        """From a manifest; validated by the API types, sent as written (the server fills the defaults)."""
        validated = FineTuneJobType.model_validate(dict(body))
        meta = validated.metadata or {}
        if not meta.get("name"):
            raise ClientError("metadata.name is required", Exit.USAGE)
        job = cls(meta["name"], connection.pop("namespace", None) or meta.get("namespace"), **connection)
        job.body = {"apiVersion": API_VERSION, "kind": KIND,
                    "metadata": {**{k: v for k, v in meta.items() if k in ("name", "labels", "annotations")},
                                 **({"namespace": job.body["metadata"]["namespace"]}
                                    if job.body["metadata"].get("namespace") else {})},
                    "spec": dict(body["spec"])}
        return job

    @classmethod
    def from_yaml(cls, path_or_text: str | os.PathLike, **connection: Any) -> "FineTuneJob":
        import yaml

        looks_like_path = isinstance(path_or_text, os.PathLike) or "\n" not in str(path_or_text)
        if looks_like_path:
            try:
                text = Path(path_or_text).read_text()
            except OSError as err:
                raise ClientError(f"{path_or_text}: {err.strerror or err}", Exit.USAGE) from err
        else:
            text = str(path_or_text)
        docs = [d for d in yaml.safe_load_all(text) if d]
        jobs = [d for d in docs if d.get("kind") == KIND]
        if len(jobs) != 1:
            raise ClientError(f"expected one {KIND} in {path_or_text}, found {len(jobs)}", Exit.USAGE)
        return cls.from_dict(jobs[0], **connection)

    @classmethod
    def get(cls, name: str, namespace: str | None = None, **connection: Any) -> "FineTuneJob":
        """One that exists already (to wait on or read)."""
        job = cls(name, namespace, **connection)
        found = job.connection.must_get(name, job.namespace)
        job.body = {k: found[k] for k in ("apiVersion", "kind", "metadata", "spec")}
        job.last = found
        return job

    @property
    def connection(self) -> Connection:
        if self._conn is None:
            kubeconfig, context, namespace = self._conn_args
            self._conn = Connection(kubeconfig, context, namespace)
        return self._conn

    @property
    def name(self) -> str:
        return self.body["metadata"]["name"]

    @property
    def namespace(self) -> str:
        return self.body["metadata"].get("namespace") or self.connection.namespace

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.body))

    def submit(self, replace: bool = False) -> "FineTuneJob":
        """Apply it (server-side apply); `replace`: delete an existing one first (a finished run runs again)."""
        if replace:
            self.connection.delete(self.name, self.namespace)
        self.last = self.connection.apply({**self.body, "metadata": {**self.body["metadata"],
                                                                    "namespace": self.namespace}})
        return self

    def status(self) -> dict[str, Any]:
        self.last = self.connection.must_get(self.name, self.namespace)
        return dict(self.last.get("status") or {})

    @property
    def phase(self) -> str | None:
        return self.status().get("phase")

    def wait(self, timeout: float | None = None, for_phase: str | None = None, interval: float = 2.0,
             raise_on_failure: bool = True, progress: bool = False) -> "FineTuneJob":
        """Until Succeeded or Failed (or `for_phase`); JobFailed on Failed/refused when `raise_on_failure`,
        WaitTimeout after `timeout` seconds. `progress`: print a line when the phase or step changes."""
        seen: list[str] = []

        def show(ftj: dict[str, Any]) -> None:
            line = progress_line(ftj, bar_width=0)
            if progress and (not seen or seen[-1] != line):
                seen.append(line)
                print(line, flush=True)

        def reached(ftj: dict[str, Any]) -> bool:
            found = outcome(ftj)
            if for_phase and (ftj.get("status") or {}).get("phase") == for_phase:
                return True
            return found.done

        self.last = follow(self.connection, self.name, self.namespace, timeout, interval, reached, show)
        found = outcome(self.last)
        if raise_on_failure and found.done and found.code != Exit.SUCCEEDED and \
                (self.last.get("status") or {}).get("phase") != for_phase:
            raise JobFailed(found)
        return self

    def result(self) -> Result:
        """The output of the run (path, files, bytes, final loss, steps); `path` is None until it Succeeded."""
        return result_of(self.last if self.last and (self.last.get("status") or {}).get("phase")
                         in FINISHED_PHASES else self.connection.must_get(self.name, self.namespace))

    def logs(self, follow_: bool = False) -> str | None:
        """The trainer's log (every attempt); with follow_, printed until the run ends."""
        chunks: list[str] = []
        follower = LogFollower(self.connection, self.name, self.namespace,
                               write=None if follow_ else chunks.append)
        if follow_:
            follower.follow()
            return None
        follower.print_all()
        return "".join(chunks)

    def delete(self) -> None:
        self.connection.delete(self.name, self.namespace)

    def __repr__(self) -> str:
        phase = ((self.last or {}).get("status") or {}).get("phase")
        return f"FineTuneJob({self.namespace if self._conn else self.body['metadata'].get('namespace')}/{self.name}" \
               + (f", {phase})" if phase else ")")
