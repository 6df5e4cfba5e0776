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
from kubesloth.operator.settings import OperatorSettings, SettingsError

SECRET_VALUE = "hf_very_secret_token_value"


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
    job = build_job(make_ftj(), settings)
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
    assert config["spec"]["training"]["optimizer"] == "paged_adamw_8bit"  # the default, written out
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
    ftj["spec"]["output"]["destination"] = "s3://bucket/out"
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
