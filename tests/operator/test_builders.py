"""The pure builders: every FineTuneJob field lands where it should in the Job and ConfigMap (no cluster)."""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from kubesloth.api import contract
from kubesloth.api.contract import Env
from kubesloth.operator import builders
from kubesloth.operator.builders import build_configmap, build_job
from kubesloth.operator.settings import OperatorSettings, ServerFeatures, SettingsError

SECRET_VALUE = "hf_very_secret_token_value"
V1_20, V1_26, V1_29 = ServerFeatures(1, 20), ServerFeatures(1, 26), ServerFeatures(1, 29)


def make_ftj(name: str = "llama-alpaca", **spec_overrides) -> dict:
    spec = {
        "model": {"source": "pvc://models/llama/base", "tokenSecretRef": {"name": "hf-token", "key": "tok"},
                  "maxSeqLength": 1024},
        "dataset": {"source": "pvc://data/alpaca.jsonl", "format": "alpaca"},
        "training": {"profile": "lean", "maxSteps": 50, "learningRate": 1e-5},
        "output": {"destination": "pvc://outputs/llama-alpaca", "checkpointEverySteps": 25},
        "resources": {"gpuProduct": "NVIDIA-L40S", "gpuMemoryGiB": 48, "memory": "64Gi", "cpu": "8"},
        "nodeSelector": {"pool": "gpu"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
        "priorityClassName": "training-high",
        "image": "registry.example/trainer:v9",
        "backoffLimit": 3,
        "activeDeadlineSeconds": 7200,
    }
    spec.update(spec_overrides)
    return {"apiVersion": "kubesloth.io/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": "ml", "uid": "0000-uid-1", "generation": 3},
            "spec": spec}


@pytest.fixture
def settings() -> OperatorSettings:
    return OperatorSettings(trainer_image="default/trainer:1", trainer_command=("python", "-m", "kubesloth.trainer"),
                            extra_env={"HF_HUB_OFFLINE": "1"})


def pod_spec(job: dict) -> dict:
    return job["spec"]["template"]["spec"]


def container(job: dict) -> dict:
    return pod_spec(job)["containers"][0]


def env_of(job: dict) -> dict:
    return {e["name"]: e for e in container(job)["env"]}


def test_job_is_owned_by_the_finetunejob_so_gc_deletes_it(settings):
    job = build_job(make_ftj(), settings)
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    assert job["metadata"]["ownerReferences"] == [{
        "apiVersion": "kubesloth.io/v1alpha1", "kind": "FineTuneJob", "name": "llama-alpaca", "uid": "0000-uid-1",
        "controller": True, "blockOwnerDeletion": True}]
    assert job["metadata"]["namespace"] == "ml"
    assert job["metadata"]["name"] == "llama-alpaca-trainer"


def test_one_pod_one_gpu_with_memory_and_cpu(settings):
    job = build_job(make_ftj(), settings)
    assert job["spec"]["completions"] == 1 and job["spec"]["parallelism"] == 1
    resources = container(job)["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == "1"
    assert resources["requests"]["nvidia.com/gpu"] == "1"
    assert resources["requests"]["memory"] == resources["limits"]["memory"] == "64Gi"
    assert resources["requests"]["cpu"] == "8"
    assert "cpu" not in resources["limits"]  # a CPU limit only throttles the data loader


def test_lifecycle_fields_reach_the_job(settings):
    job = build_job(make_ftj(), settings, V1_29)
    assert job["spec"]["backoffLimit"] == 3
    assert job["spec"]["activeDeadlineSeconds"] == 7200
    assert pod_spec(job)["restartPolicy"] == "Never"
    assert "ttlSecondsAfterFinished" not in job["spec"]  # TTL deletes the FineTuneJob, never the Job alone
    no_deadline = build_job(make_ftj(activeDeadlineSeconds=None), settings)
    assert "activeDeadlineSeconds" not in no_deadline["spec"]


def test_command_image_and_image_override(settings):
    job = build_job(make_ftj(), settings)
    assert container(job)["command"] == ["python", "-m", "kubesloth.trainer"]
    assert container(job)["image"] == "registry.example/trainer:v9"
    assert container(build_job(make_ftj(image=None), settings))["image"] == "default/trainer:1"


def test_scheduling_fields(settings):
    job = build_job(make_ftj(), settings)
    spec = pod_spec(job)
    assert spec["nodeSelector"] == {"pool": "gpu", "nvidia.com/gpu.product": "NVIDIA-L40S"}
    assert spec["priorityClassName"] == "training-high"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"} in spec["tolerations"]


def test_no_gpu_product_means_no_product_selector(settings):
    ftj = make_ftj(nodeSelector={})
    ftj["spec"]["resources"].pop("gpuProduct")
    assert "nodeSelector" not in pod_spec(build_job(ftj, settings))


def test_default_tolerations_and_node_selector_come_from_settings():
    settings = OperatorSettings(default_tolerations=({"key": "gpu", "operator": "Exists"},),
                                default_node_selector={"zone": "a"})
    spec = pod_spec(build_job(make_ftj(), settings))
    assert spec["tolerations"][0] == {"key": "gpu", "operator": "Exists"}
    assert spec["nodeSelector"]["zone"] == "a" and spec["nodeSelector"]["pool"] == "gpu"


def test_queue_name_labels_the_job_and_creates_it_suspended(settings):
    job = build_job(make_ftj(queueName="team-a"), settings)
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert job["spec"]["suspend"] is True
    plain = build_job(make_ftj(), settings)
    assert "suspend" not in plain["spec"] and "kueue.x-k8s.io/queue-name" not in plain["metadata"]["labels"]


def test_token_comes_from_the_secret_and_never_lands_in_the_configmap(settings):
    job = build_job(make_ftj(), settings)
    hf = env_of(job)[Env.HF_TOKEN.value]
    assert hf == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "tok"}}}
    configmap = build_configmap(make_ftj(), settings)
    text = json.dumps(configmap)
    assert "HF_TOKEN" not in text and SECRET_VALUE not in text
    no_token = make_ftj()
    no_token["spec"]["model"].pop("tokenSecretRef")
    assert Env.HF_TOKEN.value not in env_of(build_job(no_token, settings))


def test_configmap_holds_the_wire_form_with_identity_and_defaults(settings):
    configmap = build_configmap(make_ftj(), settings)
    assert configmap["metadata"]["name"] == "llama-alpaca-config"
    assert configmap["metadata"]["ownerReferences"][0]["uid"] == "0000-uid-1"
    config = yaml.safe_load(configmap["data"][contract.CONFIG_FILE_NAME])
    assert config["apiVersion"] == "kubesloth.io/v1alpha1" and config["kind"] == "FineTuneJob"
    assert config["metadata"] == {"name": "llama-alpaca", "namespace": "ml", "uid": "0000-uid-1", "generation": 3}
    assert config["spec"]["training"]["learningRate"] == 1e-5
    assert config["spec"]["training"]["maxGradNorm"] == 1.0  # a default, written out
    assert "optimizer" not in config["spec"]["training"]  # unset: the planner's to choose, left out
    assert config["spec"]["output"]["checkpointEverySteps"] == 25
    assert "status" not in config


def test_configmap_is_mounted_at_the_contract_path(settings):
    job = build_job(make_ftj(), settings)
    volumes = {v["name"]: v for v in pod_spec(job)["volumes"]}
    mounts = {m["mountPath"]: m for m in container(job)["volumeMounts"]}
    config_mount = mounts[contract.CONFIG_DIR]
    assert volumes[config_mount["name"]]["configMap"]["name"] == "llama-alpaca-config"
    assert config_mount["readOnly"] is True
    assert env_of(job)[Env.CONFIG.value]["value"] == contract.CONFIG_PATH


def test_env_follows_the_contract(settings):
    env = env_of(build_job(make_ftj(), settings))
    assert env[Env.METRICS_ADDR.value]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert env[Env.METRICS_PORT.value]["value"] == str(contract.METRICS_PORT)
    assert env[Env.PVC_ROOT.value]["value"] == contract.PVC_ROOT
    assert env[Env.TERMINATION_LOG.value]["value"] == contract.TERMINATION_LOG
    assert env[Env.JOB_NAME.value]["value"] == "llama-alpaca"
    assert env[Env.NAMESPACE.value]["value"] == "ml"
    assert env[Env.ENGINE.value]["value"] == "auto"
    assert env["HF_HUB_OFFLINE"]["value"] == "1"


def test_metrics_port_is_named_and_follows_settings():
    job = build_job(make_ftj(), OperatorSettings(metrics_port=9555))
    assert container(job)["ports"] == [{"name": "metrics", "containerPort": 9555, "protocol": "TCP"}]
    assert env_of(job)[Env.METRICS_PORT.value]["value"] == "9555"


def test_pvc_claims_are_mounted_once_each_under_the_pvc_root(settings):
    ftj = make_ftj()
    ftj["spec"]["dataset"]["source"] = "pvc://models/data/alpaca.jsonl"  # same claim as the model
    job = build_job(ftj, settings)
    claims = {v["persistentVolumeClaim"]["claimName"]: v for v in pod_spec(job)["volumes"]
              if "persistentVolumeClaim" in v}
    assert sorted(claims) == ["models", "outputs"]
    mounts = {m["name"]: m for m in container(job)["volumeMounts"]}
    assert mounts[claims["models"]["name"]]["mountPath"] == f"{contract.PVC_ROOT}/models"
    assert mounts[claims["models"]["name"]]["readOnly"] is True  # inputs only
    assert mounts[claims["outputs"]["name"]]["mountPath"] == f"{contract.PVC_ROOT}/outputs"
    assert mounts[claims["outputs"]["name"]]["readOnly"] is False


def test_output_claim_shared_with_input_is_writable(settings):
    ftj = make_ftj()
    ftj["spec"]["output"]["destination"] = "pvc://models/out"
    volumes = [v for v in pod_spec(build_job(ftj, settings))["volumes"] if "persistentVolumeClaim" in v]
    assert sorted((v["persistentVolumeClaim"]["claimName"], v["persistentVolumeClaim"]["readOnly"])
                  for v in volumes) == [("data", True), ("models", False)]


def test_non_pvc_sources_mount_no_claims(settings):
    ftj = make_ftj()
    ftj["spec"]["model"]["source"] = "hf://meta-llama/Llama-3.1-8B"
    ftj["spec"]["dataset"]["source"] = "s3://bucket/alpaca"
    ftj["spec"]["output"]["destination"] = "file:///out"
    assert not [v for v in pod_spec(build_job(ftj, settings))["volumes"] if "persistentVolumeClaim" in v]


def test_tmp_is_an_empty_dir(settings):
    job = build_job(make_ftj(), settings)
    volumes = {v["name"]: v for v in pod_spec(job)["volumes"]}
    tmp = next(m for m in container(job)["volumeMounts"] if m["mountPath"] == "/tmp")
    assert volumes[tmp["name"]] == {"name": tmp["name"], "emptyDir": {}}


def test_pod_security(settings):
    job = build_job(make_ftj(), settings)
    spec = pod_spec(job)
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["securityContext"]["runAsUser"] == settings.run_as_user
    sc = container(job)["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert container(job)["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert container(job)["terminationMessagePath"] == contract.TERMINATION_LOG


def test_labels_and_annotations(settings):
    job = build_job(make_ftj(), settings)
    for labels in (job["metadata"]["labels"], job["spec"]["template"]["metadata"]["labels"]):
        assert labels["kubesloth.io/finetunejob"] == "llama-alpaca"
        assert labels["app.kubernetes.io/managed-by"] == "kubesloth-operator"
        assert labels["app.kubernetes.io/part-of"] == "kubesloth"
        assert labels["app.kubernetes.io/instance"] == "llama-alpaca"
    assert job["spec"]["template"]["metadata"]["annotations"]["kubesloth.io/finetunejob"] == "llama-alpaca"


def test_long_names_stay_within_63_characters_and_deterministic(settings):
    long_name = "a" * 40 + "." + "b" * 100 + "-run"
    ftj = make_ftj(name=long_name)
    job, configmap = build_job(ftj, settings), build_configmap(ftj, settings)
    for name in (job["metadata"]["name"], configmap["metadata"]["name"],
                 job["metadata"]["labels"]["kubesloth.io/finetunejob"]):
        assert len(name) <= 63 and not name.startswith("-")
    assert job["metadata"]["name"].endswith("-trainer")
    assert build_job(copy.deepcopy(ftj), settings)["metadata"]["name"] == job["metadata"]["name"]
    other = build_job(make_ftj(name="a" * 40 + "." + "b" * 100 + "-xyz"), settings)
    assert other["metadata"]["name"] != job["metadata"]["name"]  # the hash keeps long names apart
    assert job["spec"]["template"]["metadata"]["annotations"]["kubesloth.io/finetunejob"] == long_name
    long_claim = "c" * 70
    ftj["spec"]["output"]["destination"] = f"pvc://{long_claim}/x"
    assert all(len(v["name"]) <= 63 for v in pod_spec(build_job(ftj, settings))["volumes"])


def test_builders_do_not_mutate_their_input(settings):
    ftj = make_ftj()
    before = copy.deepcopy(ftj)
    build_job(ftj, settings)
    build_configmap(ftj, settings)
    assert ftj == before


def test_settings_from_env():
    settings = OperatorSettings.from_env({
        "KUBESLOTH_OPERATOR_TRAINER_IMAGE": "x/y:1",
        "KUBESLOTH_OPERATOR_TRAINER_COMMAND": "python -c 'print(1)'",
        "KUBESLOTH_OPERATOR_NAMESPACES": "a, b",
        "KUBESLOTH_OPERATOR_DEFAULT_TOLERATIONS": "[]",
        "KUBESLOTH_OPERATOR_RESYNC_SECONDS": "2.5",
        "KUBESLOTH_OPERATOR_METRICS_PORT": "9401",
        "KUBESLOTH_OPERATOR_IMAGE_PULL_SECRETS": '[{"name": "regcred"}]',
    })
    assert settings.metrics_port == 9401
    assert settings.image_pull_secrets == ("regcred",)
    assert pod_spec(build_job(make_ftj(), settings))["imagePullSecrets"] == [{"name": "regcred"}]
    assert "imagePullSecrets" not in pod_spec(build_job(make_ftj(), OperatorSettings()))
    assert settings.trainer_image == "x/y:1"
    assert settings.trainer_command == ("python", "-c", "print(1)")
    assert settings.namespaces == ("a", "b")
    assert settings.default_tolerations == ()
    assert settings.resync_seconds == 2.5
    assert OperatorSettings.from_env({}) == OperatorSettings()


@pytest.mark.parametrize("env, named", [
    ({"KUBESLOTH_OPERATOR_RESYNC_SECONDS": "soon"}, "KUBESLOTH_OPERATOR_RESYNC_SECONDS"),
    ({"KUBESLOTH_OPERATOR_ENGINE": "tpu"}, "KUBESLOTH_OPERATOR_ENGINE"),
    ({"KUBESLOTH_OPERATOR_DEFAULT_TOLERATIONS": "{"}, "KUBESLOTH_OPERATOR_DEFAULT_TOLERATIONS"),
    ({"KUBESLOTH_OPERATOR_IMAGE_PULL_POLICY": "Sometimes"}, "KUBESLOTH_OPERATOR_IMAGE_PULL_POLICY"),
    ({"KUBESLOTH_OPERATOR_IMAGE_PULL_SECRETS": "[{}]"}, "KUBESLOTH_OPERATOR_IMAGE_PULL_SECRETS"),
    ({"KUBESLOTH_OPERATOR_METRICS_PORT": "-1"}, "KUBESLOTH_OPERATOR_METRICS_PORT"),
])
def test_bad_settings_name_the_variable(env, named):
    with pytest.raises(SettingsError, match=named):
        OperatorSettings.from_env(env)


def test_kopf_arguments_default_to_standalone_and_all_namespaces():
    from kubesloth.cli import kopf_argv

    assert kopf_argv([]) == ["run", "--module", "kubesloth.operator.handlers", "--standalone", "--all-namespaces"]
    assert kopf_argv(["--verbose"], ("a", "b"))[-4:] == ["--namespace", "a", "--namespace", "b"]
    argv = kopf_argv(["--peering", "kubesloth", "-n", "ml"])
    assert "--standalone" not in argv and "--all-namespaces" not in argv


# --- server features, interruptions, the grace period, a read-only root --------------------------------------------
@pytest.mark.parametrize("info, version", [
    ({"major": "1", "minor": "20", "gitVersion": "v1.20.2"}, (1, 20)),
    ({"major": "1", "minor": "29+", "gitVersion": "v1.29.3-eks-adc7111"}, (1, 29)),
    ({"major": "", "minor": "", "gitVersion": "v1.31.1+k3s1"}, (1, 31)),
    ({}, (1, 20)),
])
def test_server_features_from_the_version_endpoint(info, version):
    features = ServerFeatures.from_version(info)
    assert (features.major, features.minor) == version


def test_server_features_by_version():
    assert not V1_20.job_suspend and not V1_20.pod_failure_policy and not V1_20.pod_replacement_policy
    assert ServerFeatures(1, 22).job_suspend and not ServerFeatures(1, 25).pod_failure_policy
    assert V1_26.pod_failure_policy and not V1_26.pod_replacement_policy
    assert ServerFeatures(1, 28).pod_failure_policy and not ServerFeatures(1, 28).pod_replacement_policy
    assert V1_29.pod_failure_policy and V1_29.pod_replacement_policy


def test_v1_20_job_leaves_room_for_interruptions_and_has_no_newer_fields(settings):
    job = build_job(make_ftj(backoffLimit=1, maxInterruptions=50), settings, V1_20)
    assert job["spec"]["backoffLimit"] == 1 + 50  # the operator counts the two apart and stops the Job itself
    assert "podFailurePolicy" not in job["spec"] and "podReplacementPolicy" not in job["spec"]
    assert build_job(make_ftj(backoffLimit=1, maxInterruptions=50), settings)["spec"] == job["spec"]  # the default
    # a Job recreated on resume gets what is left of both budgets
    again = build_job(make_ftj(backoffLimit=1, maxInterruptions=50), settings, V1_20, prior_interruptions=7,
                      prior_failures=1)
    assert again["spec"]["backoffLimit"] == 0 + 43
    assert again["metadata"]["annotations"]["kubesloth.io/prior-interruptions"] == "7"
    assert again["metadata"]["annotations"]["kubesloth.io/prior-failures"] == "1"


def test_pod_failure_policy_from_1_26(settings):
    job = build_job(make_ftj(backoffLimit=2), settings, V1_26)
    assert job["spec"]["backoffLimit"] == 2
    assert job["spec"]["podFailurePolicy"] == {"rules": [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "FailJob", "onPodConditions": [],
         "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [2, 3, 4, 7]}},
        {"action": "Ignore", "onPodConditions": [],
         "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [6]}},
    ]}
    assert "podReplacementPolicy" not in job["spec"]
    assert build_job(make_ftj(), settings, V1_29)["spec"]["podReplacementPolicy"] == "Failed"
    assert build_job(make_ftj(backoffLimit=2), settings, V1_29, prior_failures=1)["spec"]["backoffLimit"] == 1


@pytest.mark.parametrize("features, version", [(V1_26, "1.26"), (ServerFeatures(1, 28), "1.28"), (V1_29, "1.29"),
                                               (ServerFeatures(1, 31), "1.31"), (ServerFeatures(1, 34), "1.34")])
def test_job_matches_that_versions_schema(settings, features, version):
    import kubernetes_validate

    job = build_job(make_ftj(queueName="team-a"), settings, features)
    kubernetes_validate.validate(job, version, strict=True)  # strict: a field that version lacks is an error


def test_v1_20_job_matches_the_oldest_schema_at_hand(settings):
    import kubernetes_validate

    kubernetes_validate.validate(build_job(make_ftj(), settings, V1_20), "1.25", strict=True)
    # (tests/e2e/test_job_schema.py sends it to the real v1.20 API server)


def test_strict_validation_would_catch_a_field_too_new(settings):
    import kubernetes_validate

    job = build_job(make_ftj(), settings, V1_29)
    with pytest.raises(kubernetes_validate.ValidationError):
        # podReplacementPolicy arrived in 1.28 (alpha, off by default: the schema has it, servers drop it) and is
        # used from 1.29 (beta, on); 1.27's schema does not know it
        kubernetes_validate.validate(job, "1.27", strict=True)


def test_grace_seconds_for_checkpoint():
    from kubesloth.operator.builders import (DEFAULT_GRACE_SECONDS, MAX_GRACE_SECONDS, MIN_GRACE_SECONDS,
                                             checkpoint_bytes_for, grace_seconds_for_checkpoint)

    eight_b = checkpoint_bytes_for(8_030_000_000, "paged_adamw_8bit")
    assert 31e9 < eight_b < 33e9  # bf16 weights + two 8-bit moments: ~31 GB as measured
    grace = grace_seconds_for_checkpoint(eight_b)
    assert grace >= 3 * 42  # measured: ~42 s on the H200's local disk; the default assumes a slower volume
    assert 200 <= grace <= 300
    assert grace_seconds_for_checkpoint(None) == grace_seconds_for_checkpoint(0) == DEFAULT_GRACE_SECONDS == 600
    assert grace_seconds_for_checkpoint(1) == MIN_GRACE_SECONDS
    assert grace_seconds_for_checkpoint(10**15) == MAX_GRACE_SECONDS
    assert grace_seconds_for_checkpoint(2 * eight_b) > grace  # monotonic
    assert checkpoint_bytes_for(8_030_000_000, "adamw_torch") > 2 * eight_b  # fp32 moments
    assert checkpoint_bytes_for(None) is None


def test_grace_period_reaches_the_pod_and_the_trainer(settings):
    ftj = make_ftj()
    ftj["spec"]["model"]["source"] = "hf://meta-llama/Llama-3.1-8B"
    job = build_job(ftj, settings)
    grace = pod_spec(job)["terminationGracePeriodSeconds"]
    assert 200 <= grace <= 300
    assert env_of(job)[Env.TERMINATION_GRACE_SECONDS.value]["value"] == str(grace)
    assert pod_spec(build_job(make_ftj(), settings))["terminationGracePeriodSeconds"] == 600  # size unknown
    fixed = build_job(make_ftj(terminationGracePeriodSeconds=1800), settings)
    assert pod_spec(fixed)["terminationGracePeriodSeconds"] == 1800
    assert env_of(fixed)[Env.TERMINATION_GRACE_SECONDS.value]["value"] == "1800"
    # the planner's parameter count wins over the name
    ftj["status"] = {"estimate": {"parameters": 70_000_000_000}}
    assert pod_spec(build_job(ftj, settings))["terminationGracePeriodSeconds"] > grace


@pytest.mark.parametrize("value", [0, 5, 7201])
def test_grace_period_field_is_bounded(value):
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        builders.normalized(make_ftj(terminationGracePeriodSeconds=value))


def test_read_only_root_with_writable_scratch_and_caches(settings):
    job = build_job(make_ftj(), settings)
    assert container(job)["securityContext"]["readOnlyRootFilesystem"] is True
    volumes = {v["name"]: v for v in pod_spec(job)["volumes"]}
    mounts = {m["mountPath"]: m for m in container(job)["volumeMounts"]}
    for path in ("/tmp", "/dev/shm", contract.CACHE_DIR):
        assert "emptyDir" in volumes[mounts[path]["name"]] and not mounts[path].get("readOnly")
    env = env_of(job)
    for name in ("HF_HOME", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "UNSLOTH_COMPILE_LOCATION",
                 "KUBESLOTH_CACHE_DIR"):
        assert env[name]["value"].startswith(contract.CACHE_DIR)
    moved = build_job(make_ftj(), OperatorSettings(extra_env={"HF_HOME": "/mnt/pvc/models/hf"}))
    assert env_of(moved)["HF_HOME"]["value"] == "/mnt/pvc/models/hf"  # the admin may point a cache elsewhere


def test_image_rule():
    from kubesloth.operator.builders import image_refusal

    plain = OperatorSettings(trainer_image="ghcr.io/kubesloth/trainer:0.1.0")
    assert image_refusal({"image": None}, plain) is None
    assert image_refusal({"image": "ghcr.io/kubesloth/trainer:0.1.0"}, plain) is None
    refusal = image_refusal({"image": "docker.io/evil/steal-token:1"}, plain)
    assert refusal.startswith("spec.image:") and "docker.io/evil/steal-token:1" in refusal
    allowing = OperatorSettings(allowed_images=("registry.example/ml/",))
    assert image_refusal({"image": "registry.example/ml/trainer:v9"}, allowing) is None
    assert image_refusal({"image": "registry.example/other:v9"}, allowing)
    assert image_refusal({"image": "anything"}, OperatorSettings(allowed_images=("*",))) is None
    assert OperatorSettings.from_env({"KUBESLOTH_OPERATOR_ALLOWED_IMAGES": "a/, b/"}).allowed_images == ("a/", "b/")
    assert OperatorSettings.from_env({"KUBESLOTH_OPERATOR_ALLOWED_IMAGES": '["a/"]'}).allowed_images == ("a/",)
    with pytest.raises(SettingsError, match="ALLOWED_IMAGES"):
        OperatorSettings.from_env({"KUBESLOTH_OPERATOR_ALLOWED_IMAGES": "[1]"})


# --- the v1.20 Job against the real v1.20 API server (the local control plane; marker `cluster`) ------------------
# A v1.20 API server silently drops fields it does not know (no strict field validation before 1.25), so "created"
# proves little: every field sent must come back as sent.
def missing(sent, got, path="") -> list[str]:
    """Paths of what was sent and did not come back (the server's defaults may add fields; zero values such as
    `readOnly: false` are omitted, as Go's omitempty does)."""
    if isinstance(sent, dict):
        if not isinstance(got, dict):
            return [path or "."]
        return [p for key, value in sent.items()
                for p in (missing(value, got[key], f"{path}.{key}") if key in got
                          else [] if value in (False, 0, "", [], {}) else [f"{path}.{key}"])]
    if isinstance(sent, list):
        if not isinstance(got, list) or len(got) != len(sent):
            return [path]
        return [p for i, (a, b) in enumerate(zip(sent, got)) for p in missing(a, b, f"{path}[{i}]")]
    return [] if sent == got else [path]


def test_the_job_for_this_server_keeps_every_field(cluster, kubectl, namespace):
    from kubernetes import config as kube_config

    from kubesloth.operator.kube import KubeApi

    api = KubeApi(kube_config.new_client_from_config(config_file=str(cluster.kubeconfig)))
    features = api.server_features()
    assert (features.major, features.minor) == (1, 20) and not features.pod_failure_policy
    ftj = make_ftj()
    ftj["metadata"]["namespace"] = namespace
    job = build_job(ftj, OperatorSettings(), features)
    job["metadata"].pop("ownerReferences")  # the owner does not exist here
    created = json.loads(kubectl("create", "-o", "json", "-f", "-", input=json.dumps(job)).stdout)
    assert missing(job, created) == []
    assert created["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 600
    assert created["spec"]["backoffLimit"] == 3 + 100

    # The Job built for a newer server would lose its podFailurePolicy here: why the version decides.
    newer = build_job(ftj, OperatorSettings(), ServerFeatures(1, 29))
    newer["metadata"].pop("ownerReferences")
    newer["metadata"]["name"] = "newer-trainer"
    # (--validate=false: kubectl would refuse it client-side; the operator's client sends it as is)
    got = json.loads(kubectl("create", "--validate=false", "-o", "json", "-f", "-", input=json.dumps(newer)).stdout)
    assert ".spec.podFailurePolicy" in missing(newer, got)


# --- per-job pod settings (issue 14, item 3): env, envFrom, serviceAccountName, volumes, volumeMounts ----------------
POD_SETTINGS = {
    "env": [{"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "api-key"}}},
            {"name": "AWS_REGION", "valueFrom": {"configMapKeyRef": {"name": "aws", "key": "region",
                                                                     "optional": True}}},
            {"name": "RUN_NOTE", "value": "job $(KUBESLOTH_FINETUNEJOB)"}],
    "envFrom": [{"secretRef": {"name": "s3-credentials"}}, {"prefix": "TEAM_", "configMapRef": {"name": "team"}}],
    "serviceAccountName": "trainer-irsa",
    "volumes": [{"name": "datasets", "persistentVolumeClaim": {"claimName": "shared-data", "readOnly": True}},
                {"name": "conf", "configMap": {"name": "train-conf"}},
                {"name": "gcp", "secret": {"secretName": "gcp-sa", "optional": True}},
                {"name": "scratch", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}}],
    "volumeMounts": [{"name": "datasets", "mountPath": "/mnt/datasets", "readOnly": True},
                     {"name": "conf", "mountPath": "/mnt/conf"}, {"name": "gcp", "mountPath": "/mnt/secrets/gcp"},
                     {"name": "scratch", "mountPath": "/mnt/scratch"}],
}
ALLOWING = dict(allowed_service_accounts=("trainer-irsa",), allow_secrets=True, extra_env={"HF_HUB_OFFLINE": "1"})


def test_pod_settings_reach_the_trainer_pod():
    job = build_job(make_ftj(**copy.deepcopy(POD_SETTINGS)), OperatorSettings(**ALLOWING))
    env = container(job)["env"]
    names = [e["name"] for e in env]
    # After the operator's own variables ($(KUBESLOTH_FINETUNEJOB) expands), each once, as written.
    assert names.index("WANDB_API_KEY") > names.index(Env.JOB_NAME.value) and len(names) == len(set(names))
    for item in POD_SETTINGS["env"]:
        assert item in env
    assert container(job)["envFrom"] == POD_SETTINGS["envFrom"]
    assert pod_spec(job)["serviceAccountName"] == "trainer-irsa"
    assert pod_spec(job)["automountServiceAccountToken"] is False  # the cloud identity, no Kubernetes API token
    volumes = {v["name"]: v for v in pod_spec(job)["volumes"]}
    for volume in POD_SETTINGS["volumes"]:
        assert volumes[volume["name"]] == volume
    assert {"config", "tmp", "dshm", "cache", "pvc-models", "pvc-outputs"} <= volumes.keys()  # the pod's own stay
    mounts = container(job)["volumeMounts"]
    for mount in POD_SETTINGS["volumeMounts"]:
        assert mount in mounts
    paths = [m["mountPath"] for m in mounts]
    assert len(paths) == len(set(paths)) and contract.CONFIG_DIR in paths and f"{contract.PVC_ROOT}/models" in paths


def test_without_pod_settings_the_pod_is_as_before(settings):
    job = build_job(make_ftj(), settings)
    assert "envFrom" not in container(job) and "serviceAccountName" not in pod_spec(job)
    assert not set(contract.PINNED_WITH_ENV_FROM) & set(env_of(job))
    assert {v["name"] for v in pod_spec(job)["volumes"]} == {"config", "tmp", "dshm", "cache", "pvc-models",
                                                            "pvc-data", "pvc-outputs"}
    # The operator's own service account when the FineTuneJob names none.
    own = build_job(make_ftj(), OperatorSettings(service_account_name="kubesloth-trainer"))
    assert pod_spec(own)["serviceAccountName"] == "kubesloth-trainer"


def test_env_from_pins_what_loads_code_and_the_hub_endpoint():
    """envFrom's keys are unseen by the operator; Kubernetes lets `env` win over `envFrom`, so the pod pins them."""
    job = build_job(make_ftj(envFrom=[{"configMapRef": {"name": "anything"}}]), OperatorSettings())
    env = env_of(job)
    for name, value in contract.PINNED_WITH_ENV_FROM.items():
        assert env[name] == {"name": name, "value": value}
    assert env["PYTHONNOUSERSITE"]["value"] == "1" and env["LD_PRELOAD"]["value"] == ""
    # The admin's own value stands (an air-gapped mirror).
    mirror = build_job(make_ftj(envFrom=[{"configMapRef": {"name": "anything"}}]),
                       OperatorSettings(extra_env={"HF_ENDPOINT": "https://hf-mirror.internal"}))
    assert [e for e in container(mirror)["env"] if e["name"] == "HF_ENDPOINT"] == [
        {"name": "HF_ENDPOINT", "value": "https://hf-mirror.internal"}]


def test_every_pinned_and_operator_env_name_is_reserved_in_the_schema(settings):
    """What the operator sets and pins is exactly what a FineTuneJob may not set (the CRD refuses it)."""
    from kubesloth.api.v1alpha1 import RESERVED_ENV_PATTERN
    import re

    job = build_job(make_ftj(envFrom=[{"configMapRef": {"name": "x"}}], **{"env": None}),
                    OperatorSettings(extra_env={}))
    for name in [e["name"] for e in container(job)["env"]] + list(builders.CACHE_ENV):
        assert contract.reserved_env_name(name) and re.fullmatch(RESERVED_ENV_PATTERN, name), name
    for volume in pod_spec(build_job(make_ftj(), settings))["volumes"]:
        assert volume["name"] in contract.RESERVED_VOLUME_NAMES or volume["name"].startswith(
            contract.RESERVED_VOLUME_PREFIX), volume["name"]


def test_pod_settings_rule():
    from kubesloth.operator.builders import pod_settings_refusal

    spec = builders.normalized(make_ftj(**copy.deepcopy(POD_SETTINGS)))["spec"]
    assert pod_settings_refusal(spec, OperatorSettings(**ALLOWING)) is None
    assert pod_settings_refusal(builders.normalized(make_ftj())["spec"], OperatorSettings()) is None
    # A service account only where the install allows it (default: none).
    reason, message = pod_settings_refusal(spec, OperatorSettings())
    assert reason == "ServiceAccountNotAllowed" and message.startswith("spec.serviceAccountName: 'trainer-irsa'")
    assert "trainer.jobPodSettings.serviceAccountNames" in message
    assert pod_settings_refusal(spec, OperatorSettings(allowed_service_accounts=("*",), allow_secrets=True)) is None
    assert pod_settings_refusal(spec, OperatorSettings(allowed_service_accounts=("other",)))[0] == \
        "ServiceAccountNotAllowed"
    # Secrets in env, envFrom and volumes only where the install allows them (default: not).
    assert pod_settings_refusal(spec, OperatorSettings(allowed_service_accounts=("*",)))[0] == "SecretsNotAllowed"
    reason, message = pod_settings_refusal(spec, OperatorSettings(**{**ALLOWING, "allow_secrets": False}))
    assert reason == "SecretsNotAllowed"
    assert message.startswith("spec.env[0].valueFrom.secretKeyRef, spec.envFrom[0].secretRef, spec.volumes[2].secret:")
    no_secrets = copy.deepcopy(POD_SETTINGS)
    no_secrets["env"] = no_secrets["env"][1:]
    no_secrets["envFrom"] = no_secrets["envFrom"][1:]
    no_secrets["volumes"] = [v for v in no_secrets["volumes"] if "secret" not in v]
    no_secrets["volumeMounts"] = [m for m in no_secrets["volumeMounts"] if m["name"] != "gcp"]
    quiet = builders.normalized(make_ftj(**no_secrets))["spec"]
    assert pod_settings_refusal(quiet, OperatorSettings(**{**ALLOWING, "allow_secrets": False})) is None
    # A name the operator's extra env sets for every pod is the admin's.
    clash = builders.normalized(make_ftj(env=[{"name": "HF_HUB_OFFLINE", "value": "0"}]))["spec"]
    reason, message = pod_settings_refusal(clash, OperatorSettings(extra_env={"HF_HUB_OFFLINE": "1"}))
    assert reason == "InvalidSpec" and message.startswith("spec.env[0].name: 'HF_HUB_OFFLINE'")


def test_trackers_the_trainer_image_lacks_are_refused_at_the_door():
    """The default image has tensorboardX only: reportTo wandb/mlflow on it would exit 2 in the pod, after a GPU
    was scheduled. Refused before anything is created; an image of the user's (spec.image) is theirs to know."""
    from kubesloth.operator.builders import pod_settings_refusal

    def spec(report_to, image=None):  # None: the install's trainer image
        training = {"profile": "lean", "maxSteps": 50, "reportTo": report_to}
        return builders.normalized(make_ftj(training=training, image=image))["spec"]

    settings = OperatorSettings()
    assert pod_settings_refusal(spec(["tensorboard"]), settings) is None
    reason, message = pod_settings_refusal(spec(["tensorboard", "wandb", "mlflow"]), settings)
    assert reason == "TrackerNotInImage"
    assert message.startswith("spec.training.reportTo: wandb, mlflow is not installed in the trainer image "
                              f"{settings.trainer_image} (it has: tensorboard; chart value trainer.imageTrackers)")
    assert pod_settings_refusal(spec(["wandb"], image=settings.trainer_image), settings)[0] == "TrackerNotInImage"
    assert pod_settings_refusal(spec(["wandb"], image="registry.example/ml/trainer:wandb"), settings) is None
    assert pod_settings_refusal(spec(["wandb"]), OperatorSettings(image_trackers=("tensorboard", "wandb"))) is None
    assert OperatorSettings.from_env({"KUBESLOTH_OPERATOR_IMAGE_TRACKERS": "[]"}).image_trackers == ()
    assert OperatorSettings.from_env({"KUBESLOTH_OPERATOR_IMAGE_TRACKERS": "tensorboard, wandb"}).image_trackers == \
        ("tensorboard", "wandb")
    assert OperatorSettings.from_env({}).image_trackers == ("tensorboard",)


def test_pod_settings_from_env():
    read = OperatorSettings.from_env
    assert read({}).allowed_service_accounts == () and read({}).allow_secrets is False
    assert read({"KUBESLOTH_OPERATOR_ALLOW_SECRETS": "true"}).allow_secrets is True
    assert read({"KUBESLOTH_OPERATOR_ALLOWED_SERVICE_ACCOUNTS": '["a", "b"]'}).allowed_service_accounts == ("a", "b")
    assert read({"KUBESLOTH_OPERATOR_ALLOWED_SERVICE_ACCOUNTS": "a, *"}).allowed_service_accounts == ("a", "*")
    assert read({"KUBESLOTH_OPERATOR_ALLOW_SECRETS": "false"}).allow_secrets is False
    with pytest.raises(SettingsError, match="ALLOW_SECRETS"):
        read({"KUBESLOTH_OPERATOR_ALLOW_SECRETS": "maybe"})
    with pytest.raises(SettingsError, match="ALLOWED_SERVICE_ACCOUNTS"):
        read({"KUBESLOTH_OPERATOR_ALLOWED_SERVICE_ACCOUNTS": "[1]"})


def test_a_mount_of_no_volume_is_refused_naming_the_field():
    """The schema cannot refer across fields: the types refuse it (the operator's InvalidSpec, nothing created)."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as err:
        builders.normalized(make_ftj(volumes=[{"name": "a", "emptyDir": {}}],
                                     volumeMounts=[{"name": "b", "mountPath": "/mnt/b"}]))
    (error,) = err.value.errors()
    assert error["loc"] == ("spec", "volumeMounts") and "[0].name: 'b' is not in spec.volumes" in error["msg"]


def test_a_job_with_every_pod_setting_is_kept_by_the_real_server(cluster, kubectl, namespace):
    """The v1.20 API server takes the Job as built and drops nothing (a dropped field would be a silent no-op)."""
    ftj = make_ftj(**copy.deepcopy(POD_SETTINGS))
    ftj["metadata"]["namespace"] = namespace
    job = build_job(ftj, OperatorSettings(**ALLOWING), V1_20)
    job["metadata"].pop("ownerReferences")
    created = json.loads(kubectl("create", "-o", "json", "-f", "-", input=json.dumps(job)).stdout)
    assert missing(job, created) == []


# --- the cache volume (issue 11, item 4) ------------------------------------------------------------------------------
def _cache(job: dict) -> dict:
    return next(v for v in pod_spec(job)["volumes"] if v["name"] == "cache")


def _with_estimate(ftj: dict, weights: int) -> dict:
    ftj["status"] = {"estimate": {"breakdown": {"weightsBytes": weights}}}
    return ftj


def test_the_cache_is_an_emptydir_unless_a_claim_is_named(settings):
    assert _cache(build_job(make_ftj(), settings)) == {"name": "cache", "emptyDir": {}}
    by_install = build_job(make_ftj(), OperatorSettings(cache_volume_claim="trainer-cache"))
    assert _cache(by_install) == {"name": "cache", "persistentVolumeClaim": {"claimName": "trainer-cache"}}
    by_spec = build_job(make_ftj(cache={"volumeClaimName": "team-cache"}),
                        OperatorSettings(cache_volume_claim="trainer-cache"))
    assert _cache(by_spec) == {"name": "cache", "persistentVolumeClaim": {"claimName": "team-cache"}}
    mount = next(m for m in container(by_spec)["volumeMounts"] if m["name"] == "cache")
    assert mount == {"name": "cache", "mountPath": contract.CACHE_DIR}
    assert env_of(by_spec)["HF_HOME"]["value"].startswith(contract.CACHE_DIR)  # the hub download lands on the claim


def test_an_emptydir_cache_requests_the_ephemeral_storage_of_the_hub_download(settings):
    weights = 16_060_522_496  # Llama-3.1-8B in bf16
    hub = _with_estimate(make_ftj(model={"source": "hf://meta-llama/Llama-3.1-8B", "maxSeqLength": 2048}), weights)
    requests = container(build_job(hub, settings))["resources"]["requests"]
    assert requests["ephemeral-storage"] == f"{-(-(weights + (1 << 30)) // 2**30)}Gi" == "16Gi"
    assert "ephemeral-storage" not in container(build_job(hub, settings))["resources"]["limits"]
    # Nothing is downloaded from a claim, and a cache claim holds the download itself.
    from_pvc = _with_estimate(make_ftj(), weights)
    assert "ephemeral-storage" not in container(build_job(from_pvc, settings))["resources"]["requests"]
    on_claim = build_job(hub, OperatorSettings(cache_volume_claim="trainer-cache"))
    assert "ephemeral-storage" not in container(on_claim)["resources"]["requests"]
