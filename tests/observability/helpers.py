"""Shared helpers: a trainer-shaped registry with the contract's metric names, and promtool invocation."""

from __future__ import annotations

import subprocess
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge

from kubesloth.api import contract

LABELS = ["namespace", "finetunejob"]


def trainer_like_registry(namespace: str, name: str, values: dict[str, float]) -> CollectorRegistry:
    """A real prometheus-client registry exposing `values` (contract metric name -> value) the way a trainer
    would: gauges, and a counter for the tokens total. Independent of the trainer's own code, so the parser is
    pinned to the contract, not to one implementation."""
    registry = CollectorRegistry()
    for metric, value in values.items():
        if metric.endswith("_total") and metric == contract.METRIC_TOKENS:
            counter = Counter(metric[: -len("_total")], "tokens trained", LABELS, registry=registry)
            counter.labels(namespace, name).inc(value)
        else:
            gauge = Gauge(metric, metric.replace("_", " "), LABELS, registry=registry)
            gauge.labels(namespace, name).set(value)
    return registry


def run_promtool(promtool: Path, *args: str, input: str | None = None,
                 cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(promtool), *args], input=input, capture_output=True, text=True, timeout=120,
                          cwd=cwd)


class PrometheusError(AssertionError):
    pass


class PrometheusServer:
    """A real Prometheus (Debian's 2.42) on loopback with a generated config of static targets; stopped by pid."""

    def __init__(self, prometheus: Path, workdir: Path, targets: dict[str, list[str]],
                 scrape_interval: str = "1s", rule_files: list[Path] = ()):
        from kubesloth.local.cluster import free_port

        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": scrape_interval, "scrape_timeout": scrape_interval,
                       "evaluation_interval": scrape_interval},
            # honor_labels: the metrics' own `namespace` label is the FineTuneJob's (the chart's monitors do the
            # same); static targets add only `job` and `instance`.
            "scrape_configs": [{"job_name": job, "honor_labels": True, "static_configs": [{"targets": hosts}]}
                               for job, hosts in targets.items()],
            "rule_files": [str(path) for path in rule_files],
        }
        import yaml

        (self.workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = open(self.workdir / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [str(prometheus / "prometheus"), f"--config.file={self.workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.workdir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
             "--storage.tsdb.retention.time=1h"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 30) -> None:
        import time
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PrometheusError(f"prometheus exited {self.proc.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise PrometheusError(f"prometheus not ready after {timeout}s: {self.log_tail()}")

    def log_tail(self) -> str:
        self.log.flush()
        return (self.workdir / "prometheus.log").read_text()[-3000:]

    def api(self, path: str, **params: str):
        import json
        import urllib.error
        import urllib.parse
        import urllib.request

        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params, doseq=True)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as err:  # 400/422: a PromQL error, with Prometheus' message
            body = json.loads(err.read() or b"{}")
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}") from None
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """Instant query (now, or at the unix time `at`); the result vector (a scalar comes back as one sample)."""
        data = self.api("query", query=expr, **({"time": str(at)} if at is not None else {}))
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def query_range(self, expr: str, seconds: float, step: str = "1s") -> list[dict]:
        import time

        end = time.time()
        return self.api("query_range", query=expr, start=str(end - seconds), end=str(end), step=step)["result"]

    def targets_up(self) -> dict[str, bool]:
        return {target["scrapeUrl"]: target["health"] == "up" for target in self.api("targets")["activeTargets"]}

    def wait_for(self, expr: str, predicate=lambda result: bool(result), timeout: float = 60) -> list[dict]:
        import time

        deadline = time.monotonic() + timeout
        result: list[dict] = []
        while time.monotonic() < deadline:
            result = self.query(expr)
            if predicate(result):
                return result
            time.sleep(0.5)
        raise PrometheusError(f"{expr!r} never satisfied the condition in {timeout}s; last result {result}; "
                              f"targets {self.targets_up()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# --- dashboards ------------------------------------------------------------------------------------------------
def dashboard_queries(dashboard: dict) -> list[tuple[int, str, str]]:
    """(panel id, panel title, expr) of every query target of every panel (rows' nested panels included)."""
    out = []

    def walk(panels):
        for panel in panels:
            for target in panel.get("targets") or []:
                out.append((panel["id"], panel["title"], target.get("expr", "")))
            walk(panel.get("panels") or [])

    walk(dashboard.get("panels") or [])
    return out


def substitute(expr: str, variables: dict[str, str], range_seconds: int = 600) -> str:
    """Grafana's template variables as Grafana would fill them for a `range_seconds` time range."""
    builtins = {"$__rate_interval": "1m", "$__interval": "15s", "$__range_s": str(range_seconds),
                "$__range": f"{range_seconds}s"}
    for name, value in builtins.items():
        expr = expr.replace(name, value)
    for name, value in variables.items():
        expr = expr.replace("${" + name + "}", value).replace("$" + name, value)
    return expr
