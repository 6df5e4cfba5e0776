"""Render the chart with the Helm v4 SDK (helm-python-sdk) and hand back parsed manifests."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

from kubesloth.local.cluster import REPO_ROOT

CHART_DIR = REPO_ROOT / "charts" / "kubesloth"
RELEASE = "ks"
RELEASE_NAMESPACE = "kubesloth-system"

# The value sets every render test runs over.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "integrations": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "podMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "grafanaDashboards": {"enabled": True},
        "imagePullSecrets": [{"name": "operator-pull"}],
        "trainer": {"image": {"repository": "registry.example.com/ml/kubesloth-trainer", "tag": "0.1.0-cu128"},
                    "imagePullSecrets": [{"name": "trainer-pull"}]},
        "gpuPrices": {"NVIDIA-L40S": 0.99, "NVIDIA-H100-80GB-HBM3": 2.5},
        "defaultGpuHourlyPrice": 0.25,
    },
    "namespaced": {"watchNamespaces": ["team-a", "team-b"]},
}


@dataclass
class Rendered:
    values: dict[str, Any]
    docs: list[dict[str, Any]]
    notes: str
    by_template: dict[str, str] = field(default_factory=dict)

    def kinds(self, kind: str) -> list[dict[str, Any]]:
        return [doc for doc in self.docs if doc["kind"] == kind]

    def one(self, kind: str) -> dict[str, Any]:
        found = self.kinds(kind)
        assert len(found) == 1, f"expected one {kind}, got {[d['metadata']['name'] for d in found]}"
        return found[0]

    @property
    def deployment(self) -> dict[str, Any]:
        return self.one("Deployment")

    @property
    def container(self) -> dict[str, Any]:
        return self.deployment["spec"]["template"]["spec"]["containers"][0]

    def operator_env(self) -> dict[str, str]:
        """The operator container's environment as the kubelet would resolve it (ConfigMap refs looked up)."""
        configmaps = {doc["metadata"]["name"]: doc.get("data", {}) for doc in self.kinds("ConfigMap")}
        env: dict[str, str] = {}
        for item in self.container.get("env", []):
            if "value" in item:
                env[item["name"]] = item["value"]
            elif "configMapKeyRef" in item.get("valueFrom", {}):
                ref = item["valueFrom"]["configMapKeyRef"]
                env[item["name"]] = configmaps[ref["name"]][ref["key"]]
        return env


def load_chart(path: Path = CHART_DIR) -> helm.Chart:
    return helm.Chart.load(str(path))


def render(values: dict[str, Any], chart_dir: Path = CHART_DIR, name: str = RELEASE,
           namespace: str = RELEASE_NAMESPACE) -> Rendered:
    with load_chart(chart_dir) as chart:
        by_template = chart.render(values, name=name, namespace=namespace)
    docs: list[dict[str, Any]] = []
    notes = ""
    for template, text in sorted(by_template.items()):
        if template.endswith("NOTES.txt"):
            notes = text
            continue
        docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return Rendered(values=values, docs=docs, notes=notes, by_template=by_template)


def chart_crds(chart_dir: Path = CHART_DIR) -> list[dict[str, Any]]:
    with load_chart(chart_dir) as chart:
        return [yaml.safe_load(item["data"]) for item in chart.crds]


def dumps(docs: list[dict[str, Any]]) -> str:
    return "\n---\n".join(json.dumps(doc) for doc in docs)
