"""The chart, offline: Helm v4 lints it strictly and renders it for each value set; the values schema rejects bad
values naming them; every manifest passes kubernetes-validate --strict; the objects say what the operator needs.
Each value set is rendered once per module."""

from __future__ import annotations

import copy
import json
import shutil

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from kubesloth.api import crd as crd_module
from kubesloth.operator import builders
from kubesloth.operator import metrics as operator_metrics, progress
from kubesloth.operator.progress import PriceTable
from kubesloth.operator.settings import OperatorSettings

from .chart import CHART_DIR, RELEASE_NAMESPACE, VALUE_SETS, chart_crds, render

# Oldest cluster docs/install.md supports and the newest schema kubernetes-validate ships.
KUBE_VERSIONS = ["1.26.0", "1.37.0"]


@pytest.fixture(scope="module")
def rendered():
    cache: dict = {}

    def get(value_set: str):
        if value_set not in cache:
            cache[value_set] = render(VALUE_SETS[value_set])
        return cache[value_set]

    return get


# --- lint and render --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_helm_lints_the_chart_strictly(value_set):
    report = helm.lint(str(CHART_DIR), VALUE_SETS[value_set], strict=True, namespace=RELEASE_NAMESPACE)
    assert report["errors"] == []
    # Severity 2 = warning, 3 = error; strict mode fails on either. (1 = info: "icon is recommended".)
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_renders_the_operator_and_its_access(rendered, value_set):
    kinds = {doc["kind"] for doc in rendered(value_set).docs}
    assert {"Deployment", "ServiceAccount", "Service", "ConfigMap", "ClusterRole", "ClusterRoleBinding"} <= kinds


# --- values schema ----------------------------------------------------------------------------------------------
# (values, what the message must name, what it must say)
BAD_VALUES = [
    ({"operator": {"logLevel": "loud"}}, "/operator/logLevel", "'info', 'debug'"),
    ({"watchNamespaces": ["Team_A"]}, "/watchNamespaces/0", "does not match pattern"),
    ({"watchNamespaces": ["team-a", "team-a"]}, "/watchNamespaces", "items at 0 and 1 are equal"),
    ({"gpuPrices": {"NVIDIA-L40S": -1}}, "/gpuPrices/NVIDIA-L40S", "minimum"),
    ({"gpuPrices": {"NVIDIA-L40S": "cheap"}}, "/gpuPrices/NVIDIA-L40S", "want number"),
    ({"trainer": {"tolerations": [{"operator": "Sometimes"}]}}, "/trainer/tolerations/0/operator", "'Exists', 'Equal'"),
    ({"trainer": {"image": {"repository": ""}}}, "/trainer/image/repository", "minLength"),
    ({"trainer": {"imagePullSecrets": ["regcred"]}}, "/trainer/imagePullSecrets/0", "want object"),
    ({"operator": {"healthPort": 70000}}, "/operator/healthPort", "maximum"),
    ({"serviceMonitor": {"enabled": "yes"}}, "/serviceMonitor/enabled", "want boolean"),
    ({"serviceMonitor": {"enabled": True, "interval": "often"}}, "/serviceMonitor/interval", "does not match"),
    ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy", "'Always', 'IfNotPresent', 'Never'"),
    ({"operator": {"resources": {"limits": {"memory": "lots"}}}}, "/operator/resources/limits/memory",
     "does not match"),
    ({"operatr": {"logLevel": "debug"}}, "additional properties 'operatr' not allowed", ""),
    ({"grafanaDashboards": {"enabled": True, "labels": {"grafana_dashboard": 1}}},
     "/grafanaDashboards/labels/grafana_dashboard", "want string"),
    ({"trainer": {"jobPodSettings": {"secrets": "no"}}}, "/trainer/jobPodSettings/secrets", "want boolean"),
    ({"trainer": {"jobPodSettings": {"serviceAccountNames": ["Bad_SA"]}}},
     "/trainer/jobPodSettings/serviceAccountNames/0", "does not match pattern"),
    ({"trainer": {"jobPodSettings": {"serviceAccountName": ["a"]}}}, "additional properties 'serviceAccountName'", ""),
    ({"trainer": {"imageTrackers": ["comet"]}}, "/trainer/imageTrackers/0", "'tensorboard', 'wandb', 'mlflow'"),
]


@pytest.mark.parametrize("values,where,what", BAD_VALUES, ids=[json.dumps(v) for v, _, _ in BAD_VALUES])
def test_schema_rejects_bad_values_naming_them(values, where, what):
    with pytest.raises(helm.HelmValuesError) as caught:
        render(values)
    message = str(caught.value)
    assert where in message and what in message, message


def test_fail_when_service_monitor_has_no_service():
    with pytest.raises(helm.HelmError, match="serviceMonitor.enabled needs metrics.service.enabled"):
        render({"serviceMonitor": {"enabled": True}, "metrics": {"service": {"enabled": False}}})


# --- kubernetes-validate --strict -------------------------------------------------------------------------------
# kubernetes-validate knows only built-in kinds; the Prometheus Operator's are checked against the part of their
# shape this chart uses (fields as the monitoring.coreos.com/v1 CRDs spell them; unknown fields rejected).
_labels = {"type": "object", "additionalProperties": {"type": "string"}}
_meta = {"type": "object", "required": ["name", "namespace"],
         "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}, "labels": _labels}}
_duration = {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
                                          "(([0-9]+)s)?(([0-9]+)ms)?)$"}
_selector = {"type": "object", "additionalProperties": False, "minProperties": 1,
             "properties": {"matchLabels": _labels, "matchExpressions": {"type": "array"}}}
_endpoint = {"type": "object", "additionalProperties": False, "required": ["port"],
             "properties": {"port": {"type": "string"}, "path": {"type": "string"}, "interval": _duration,
                            "honorLabels": {"type": "boolean"},
                            "scrapeTimeout": _duration}}
_ns_selector = {"type": "object", "additionalProperties": False,
                "properties": {"any": {"type": "boolean"}, "matchNames": {"type": "array",
                                                                          "items": {"type": "string"}}}}


def _cr(spec: dict) -> dict:
    return {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
            "properties": {"apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"type": "string"},
                           "metadata": _meta, "spec": spec}}


CR_SCHEMAS = {
    "ServiceMonitor": _cr({"type": "object", "additionalProperties": False, "required": ["selector", "endpoints"],
                           "properties": {"selector": _selector, "namespaceSelector": _ns_selector,
                                          "endpoints": {"type": "array", "minItems": 1, "items": _endpoint}}}),
    "PodMonitor": _cr({"type": "object", "additionalProperties": False,
                       "required": ["selector", "podMetricsEndpoints"],
                       "properties": {"selector": _selector, "namespaceSelector": _ns_selector,
                                      "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": _endpoint}}}),
    "PrometheusRule": _cr({"type": "object", "additionalProperties": False, "required": ["groups"], "properties": {
        "groups": {"type": "array", "items": {
            "type": "object", "required": ["name", "rules"],
            "properties": {"name": {"type": "string", "minLength": 1}, "interval": _duration, "rules": {
                "type": "array", "items": {
                    "type": "object", "required": ["expr"], "additionalProperties": False,
                    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                    "properties": {"alert": {"type": "string"}, "record": {"type": "string"},
                                   "expr": {"type": ["string", "integer"]}, "for": _duration,
                                   "keep_firing_for": _duration, "labels": _labels,
                                   "annotations": _labels}}}}}}}}),
}


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_manifests_pass_kubernetes_validate_strict(rendered, value_set):
    docs = rendered(value_set).docs
    for doc in docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in CR_SCHEMAS:
            assert doc["apiVersion"] == "monitoring.coreos.com/v1", where
            jsonschema.validate(doc, CR_SCHEMAS[doc["kind"]])
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                pytest.fail(f"{where} invalid for Kubernetes {version}: {err.message} at {list(err.path)}")


def test_strict_validation_would_catch_a_typo(rendered):
    # The check above is not vacuous: one misspelt field in the Deployment fails it.
    deployment = copy.deepcopy(rendered("defaults").deployment)
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[0], strict=True)


def test_the_chart_crd_is_the_generated_crd():
    chart_files = sorted(p.name for p in (CHART_DIR / "crds").iterdir())
    assert chart_files == sorted(p.name for p in (crd_module.REPO_ROOT / "crds").iterdir())
    for name in chart_files:
        assert (CHART_DIR / "crds" / name).read_bytes() == (crd_module.REPO_ROOT / "crds" / name).read_bytes(), (
            f"charts/kubesloth/crds/{name} differs from crds/{name}: run `kubesloth crd --write`")
    # And Helm loads it as the chart's CRD (installed before the templates).
    assert [doc["metadata"]["name"] for doc in chart_crds()] == ["finetunejobs.kubesloth.io"]
    for doc in chart_crds():
        kubernetes_validate.validate(doc, KUBE_VERSIONS[0], strict=True)


# --- the operator Deployment ------------------------------------------------------------------------------------
def _arg(container: dict, flag: str) -> list[str]:
    return [a.split("=", 1)[1] for a in container["args"] if a.startswith(flag + "=")]


def test_operator_deployment(rendered):
    out = rendered("defaults")
    deployment, container = out.deployment, out.container
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert container["command"] == ["kubesloth", "operator"]
    # Probes hit kopf's liveness endpoint on the port the operator is told to serve it on.
    (liveness_url,) = _arg(container, "--liveness")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert liveness_url == f"http://0.0.0.0:{ports['health']}/healthz"
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    # Non-root, read-only root filesystem with a writable /tmp.
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert "emptyDir" in volumes[tmp["name"]]
    assert container["resources"]["requests"]["memory"] and container["resources"]["limits"]["memory"]
    assert pod["serviceAccountName"] == out.one("ServiceAccount")["metadata"]["name"]
    # The metrics Service points at the container's `metrics` port.
    service = out.one("Service")
    assert service["spec"]["ports"][0]["name"] == "metrics"
    assert service["spec"]["ports"][0]["targetPort"] == "metrics" and "metrics" in ports
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_operator_settings_come_from_the_chart(rendered):
    """The env the chart sets is what the operator's own settings parsers read (names wired exactly)."""
    out = rendered("integrations")
    env = out.operator_env()
    settings = OperatorSettings.from_env(env)
    assert settings.trainer_image == "registry.example.com/ml/kubesloth-trainer:0.1.0-cu128"
    assert list(settings.default_tolerations) == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert settings.metrics_port == 9400
    assert settings.image_pull_policy == "IfNotPresent"
    assert settings.image_pull_secrets == ("trainer-pull",)
    prices = PriceTable.from_env(env)
    assert dict(prices.prices) == EXPECTED_PRICES and prices.default == 0.25
    assert prices.price("nvidia-l40s") == 0.99 and prices.price("NVIDIA-B200") == 0.25
    assert operator_metrics.settings_from_env(env)[1] == 9090
    # Every KUBESLOTH_* variable the chart sets is one the operator reads: none silently ignored.
    for name in env:
        if name.startswith("KUBESLOTH_"):
            assert name in _env_the_operator_reads(), f"the chart sets {name} but the operator does not read it"


def _env_the_operator_reads() -> set[str]:
    known = {"KUBESLOTH_OPERATOR_" + name.upper() for name in OperatorSettings.__dataclass_fields__}
    known |= {"KUBESLOTH_OPERATOR_DEFAULT_TOLERATIONS", "KUBESLOTH_OPERATOR_METRICS_PORT",
              "KUBESLOTH_OPERATOR_IMAGE_PULL_POLICY"}  # settings fields spelt differently (settings.from_env)
    return known | {operator_metrics.PORT_ENV, progress.PRICES_ENV, progress.DEFAULT_PRICE_ENV}


def test_trainer_pods_get_the_chart_pull_secrets(rendered):
    settings = OperatorSettings.from_env(rendered("integrations").operator_env())
    pod = builders.build_job(_FTJ, settings)["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": "trainer-pull"}]
    assert pod["containers"][0]["image"] == "registry.example.com/ml/kubesloth-trainer:0.1.0-cu128"
    assert pod["tolerations"][0] == {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def test_job_pod_settings_reach_the_operator():
    """trainer.jobPodSettings is what the operator enforces: by default no service account and no Secrets; set,
    exactly the chart's values (the operator refuses a FineTuneJob beyond them, builders.pod_settings_refusal)."""
    from kubesloth.operator.builders import pod_settings_refusal

    default = OperatorSettings.from_env(render({}).operator_env())
    assert default.allowed_service_accounts == () and default.allow_secrets is False
    spec = builders.normalized({**_FTJ, "spec": {**_FTJ["spec"], "serviceAccountName": "trainer-irsa",
                                                 "envFrom": [{"secretRef": {"name": "s3"}}]}})["spec"]
    assert pod_settings_refusal(spec, default)[0] == "ServiceAccountNotAllowed"
    out = render({"trainer": {"jobPodSettings": {"serviceAccountNames": ["trainer-irsa", "other"],
                                                 "secrets": False}}})
    env = out.operator_env()
    assert json.loads(env["KUBESLOTH_OPERATOR_ALLOWED_SERVICE_ACCOUNTS"]) == ["trainer-irsa", "other"]
    settings = OperatorSettings.from_env(env)
    assert settings.allowed_service_accounts == ("trainer-irsa", "other") and settings.allow_secrets is False
    assert pod_settings_refusal(spec, settings)[0] == "SecretsNotAllowed"
    anyone = OperatorSettings.from_env(render({"trainer": {"jobPodSettings": {"serviceAccountNames": ["*"]}}})
                                       .operator_env())
    assert pod_settings_refusal(spec, anyone)[0] == "SecretsNotAllowed"  # secrets stays false (Helm merges)
    trusted = OperatorSettings.from_env(render({"trainer": {"jobPodSettings": {"serviceAccountNames": ["*"],
                                                                               "secrets": True}}}).operator_env())
    assert pod_settings_refusal(spec, trusted) is None


def test_image_trackers_reach_the_operator():
    """trainer.imageTrackers: by default tensorboard only (the default image's tensorboardX), so reportTo wandb on
    it is refused at the door; listed, it is allowed."""
    from kubesloth.operator.builders import pod_settings_refusal

    spec = builders.normalized({**_FTJ, "spec": {**_FTJ["spec"], "image": None,
                                                 "training": {"profile": "lean", "reportTo": ["wandb"]}}})["spec"]
    default = OperatorSettings.from_env(render({}).operator_env())
    assert default.image_trackers == ("tensorboard",)
    assert pod_settings_refusal(spec, default)[0] == "TrackerNotInImage"
    wandb = OperatorSettings.from_env(render({"trainer": {"imageTrackers": ["tensorboard", "wandb"]}}).operator_env())
    assert wandb.image_trackers == ("tensorboard", "wandb") and pod_settings_refusal(spec, wandb) is None
    none = OperatorSettings.from_env(render({"trainer": {"imageTrackers": []}}).operator_env())
    assert none.image_trackers == ()


def test_the_cache_volume_claim_reaches_the_trainer_pod():
    """trainer.cacheVolumeClaim: unset, the pod's cache is an emptyDir; set, the operator mounts that claim."""
    assert OperatorSettings.from_env(render({}).operator_env()).cache_volume_claim is None
    settings = OperatorSettings.from_env(render({"trainer": {"cacheVolumeClaim": "trainer-cache"}}).operator_env())
    job = builders.build_job(_FTJ, settings)
    cache = next(v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "cache")
    assert cache == {"name": "cache", "persistentVolumeClaim": {"claimName": "trainer-cache"}}


# Helm merges a user's gpuPrices into the chart's table: overrides win, other products keep the chart's price
# (a user drops one with `NVIDIA-A10G: null`).
EXPECTED_PRICES = {**yaml.safe_load((CHART_DIR / "values.yaml").read_text())["gpuPrices"],
                   "NVIDIA-L40S": 0.99, "NVIDIA-H100-80GB-HBM3": 2.5}


def test_gpu_price_table_and_trainer_image_reach_the_operator(rendered):
    out = rendered("integrations")
    env = out.operator_env()
    assert json.loads(env["KUBESLOTH_GPU_PRICES"]) == EXPECTED_PRICES
    assert json.loads(env["KUBESLOTH_OPERATOR_IMAGE_PULL_SECRETS"]) == [{"name": "trainer-pull"}]
    assert out.deployment["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "operator-pull"}]
    # A new price table restarts the operator on upgrade (the pod template's checksum changes).
    cheaper = render({**VALUE_SETS["integrations"], "gpuPrices": {"NVIDIA-L40S": 0.5}})
    annotation = "checksum/config"
    assert (cheaper.deployment["spec"]["template"]["metadata"]["annotations"][annotation]
            != out.deployment["spec"]["template"]["metadata"]["annotations"][annotation])


_FTJ = {"apiVersion": "kubesloth.io/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": "demo", "namespace": "ml", "uid": "u-1"},
        "spec": {"model": {"source": "hf://org/model"}, "dataset": {"source": "hf://org/data"},
                 "output": {"destination": "pvc://outputs/demo"}}}


# --- RBAC -------------------------------------------------------------------------------------------------------
def _rules(role: dict) -> dict[tuple[str, str], set[str]]:
    rules: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                rules.setdefault((group, resource), set()).update(rule["verbs"])
    return rules


# Exactly what the operator calls (operator/kube.py, kopf's watches, annotations and events); the install test
# proves it is enough, this pins it so nothing creeps in.
NAMESPACED_RULES = {
    ("kubesloth.io", "finetunejobs"): {"get", "list", "watch", "patch", "delete"},
    ("kubesloth.io", "finetunejobs/status"): {"patch"},
    ("batch", "jobs"): {"create", "get", "list", "watch", "patch", "delete"},
    ("", "pods"): {"list", "watch"},
    ("", "configmaps"): {"create", "get", "update", "list", "watch"},
    ("", "events"): {"create"},
}
CLUSTER_RULES = {("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"}}


def test_cluster_wide_rbac(rendered):
    out = rendered("defaults")
    assert out.kinds("Role") == [] and out.kinds("RoleBinding") == []
    role = out.one("ClusterRole")
    assert _rules(role) == {**NAMESPACED_RULES, **CLUSTER_RULES}
    binding = out.one("ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": out.one("ServiceAccount")["metadata"]["name"],
                                    "namespace": RELEASE_NAMESPACE}]
    assert "--all-namespaces" in out.container["args"]
    assert not _arg(out.container, "--namespace")


def test_namespaced_rbac(rendered):
    out = rendered("namespaced")
    roles = {r["metadata"]["namespace"]: r for r in out.kinds("Role")}
    bindings = {b["metadata"]["namespace"]: b for b in out.kinds("RoleBinding")}
    assert sorted(roles) == sorted(bindings) == ["team-a", "team-b"]
    for namespace, role in roles.items():
        assert _rules(role) == NAMESPACED_RULES, namespace
        assert bindings[namespace]["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                                  "name": role["metadata"]["name"]}
    # Cluster-wide, only what cannot be namespaced: reading CRDs and namespace names (kopf follows the listed
    # namespaces). No FineTuneJobs, Jobs or pods anywhere else.
    assert _rules(out.one("ClusterRole")) == {**CLUSTER_RULES, ("", "namespaces"): {"list", "watch"}}
    assert sorted(_arg(out.container, "--namespace")) == ["team-a", "team-b"]
    # The operator's own resync lists only these namespaces too.
    assert OperatorSettings.from_env(out.operator_env()).namespaces == ("team-a", "team-b")
    assert "--all-namespaces" not in out.container["args"]
    assert "team-a" in out.notes and "team-b" in out.notes


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_rbac_grants_no_wildcards_and_no_secrets(rendered, value_set):
    for role in rendered(value_set).kinds("ClusterRole") + rendered(value_set).kinds("Role"):
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule
            assert "secrets" not in rule["resources"], rule
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), rule


# --- Prometheus Operator and Grafana ----------------------------------------------------------------------------
def test_integrations_off_by_default(rendered):
    kinds = {doc["kind"] for doc in rendered("defaults").docs}
    assert not kinds & {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
    assert not [cm for cm in rendered("defaults").kinds("ConfigMap")
                if cm["metadata"].get("labels", {}).get("grafana_dashboard")]


def test_service_monitor_scrapes_the_metrics_service(rendered):
    out = rendered("integrations")
    monitor, service = out.one("ServiceMonitor"), out.one("Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [RELEASE_NAMESPACE]}
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [p["name"] for p in service["spec"]["ports"]]
    # The operator's per-job series carry the job's namespace: it must win over the scrape target's.
    assert all(e["honorLabels"] is True for e in monitor["spec"]["endpoints"])
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_pod_monitor_scrapes_the_trainer_pods_the_operator_builds(rendered):
    monitor = rendered("integrations").one("PodMonitor")
    pod = builders.build_job(_FTJ, OperatorSettings())["spec"]["template"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    port_names = [p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])]
    assert [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]] == ["metrics"]
    assert all(e["honorLabels"] is True for e in monitor["spec"]["podMetricsEndpoints"])
    assert "metrics" in port_names
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    namespaced = render({**VALUE_SETS["namespaced"], "podMonitor": {"enabled": True}}).one("PodMonitor")
    assert namespaced["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}


SAMPLE_DASHBOARD = {"title": "Sample", "uid": "sample", "panels": [{"type": "timeseries", "targets": [
    {"expr": "kubesloth_train_loss"}]}]}
SAMPLE_ALERTS = {"groups": [{"name": "sample.rules", "rules": [
    {"alert": "SampleAlert", "expr": "up == 0", "for": "5m", "labels": {"severity": "warning"},
     "annotations": {"summary": "down"}}]}]}


def test_dashboards_and_alerts_render_from_files(tmp_path):
    """Whatever files/dashboards/*.json and files/alerts/*.yaml hold ends up in ConfigMaps and a PrometheusRule."""
    chart = tmp_path / "kubesloth"
    shutil.copytree(CHART_DIR, chart)
    for sub in ("dashboards", "alerts"):
        shutil.rmtree(chart / "files" / sub)
        (chart / "files" / sub).mkdir()
    (chart / "files" / "dashboards" / "training_overview.json").write_text(json.dumps(SAMPLE_DASHBOARD, indent=1))
    (chart / "files" / "dashboards" / "operator.json").write_text(json.dumps({**SAMPLE_DASHBOARD, "uid": "op"}))
    (chart / "files" / "alerts" / "a.yaml").write_text(yaml.safe_dump(SAMPLE_ALERTS))
    second = {"groups": [{"name": "second.rules", "rules": [{"record": "x:y", "expr": "sum(up)"}]}]}
    (chart / "files" / "alerts" / "b.yaml").write_text(yaml.safe_dump(second))
    out = render({**VALUE_SETS["integrations"], "grafanaDashboards": {"enabled": True, "namespace": "monitoring"}},
                 chart_dir=chart)
    dashboards = {cm["metadata"]["name"]: cm for cm in out.kinds("ConfigMap")
                  if cm["metadata"]["labels"].get("grafana_dashboard") == "1"}
    assert sorted(dashboards) == ["ks-kubesloth-dashboard-operator", "ks-kubesloth-dashboard-training-overview"]
    overview = dashboards["ks-kubesloth-dashboard-training-overview"]
    assert json.loads(overview["data"]["training_overview.json"]) == SAMPLE_DASHBOARD
    assert overview["metadata"]["namespace"] == "monitoring"
    rule = out.one("PrometheusRule")
    assert rule["spec"]["groups"] == SAMPLE_ALERTS["groups"] + second["groups"]
    jsonschema.validate(rule, CR_SCHEMAS["PrometheusRule"])
    # A file that is not a rule file fails the render with its name, not a half-empty PrometheusRule.
    (chart / "files" / "alerts" / "c.yaml").write_text("rules: []\n")
    with pytest.raises(helm.HelmError, match="c.yaml has no `groups:`"):
        render(VALUE_SETS["integrations"], chart_dir=chart)


def test_the_shipped_dashboards_and_alerts_are_all_rendered(rendered):
    out = rendered("integrations")
    shipped_dashboards = sorted((CHART_DIR / "files" / "dashboards").glob("*.json"))
    dashboards = [cm for cm in out.kinds("ConfigMap") if cm["metadata"]["labels"].get("grafana_dashboard") == "1"]
    assert sorted(key for cm in dashboards for key in cm["data"]) == [p.name for p in shipped_dashboards]
    for cm in dashboards:
        for key, text in cm["data"].items():
            assert json.loads(text) == json.loads((CHART_DIR / "files" / "dashboards" / key).read_text())
    groups = [g for path in sorted((CHART_DIR / "files" / "alerts").glob("*.yaml"))
              for g in yaml.safe_load(path.read_text())["groups"]]
    assert out.one("PrometheusRule")["spec"]["groups"] == groups


def test_notes_tell_the_user_what_to_do_next(rendered):
    notes = rendered("defaults").notes
    assert f"-n {RELEASE_NAMESPACE} rollout status deployment/ks-kubesloth" in notes
    assert "kubectl get ftj" in notes and "nvidia.com/gpu" in notes
    assert "every namespace" in notes
