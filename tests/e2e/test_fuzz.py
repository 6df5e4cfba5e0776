"""Fuzz (issue 12, 6): a seeded generator of mutated FineTuneJobs, created on the real API server with the real
operator running (no node agent: pods stay Pending, nothing trains). Each is either refused by the API server
with a message naming the field, or gets a status phase or condition within the bound; none has a child (Job,
ConfigMap) without a status; the operator's log has no traceback and the operator is still up at the end.

KUBESLOTH_FUZZ_SEED and KUBESLOTH_FUZZ_COUNT pick another run (the seed is in the failure message)."""

from __future__ import annotations

import copy
import json
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import urllib3
from kubernetes import client
from kubernetes import config as kube_config
from kubernetes.client.exceptions import ApiException

from .stack import Stack, finetunejob, wait_for

pytestmark = pytest.mark.cluster

SEED = int(os.environ.get("KUBESLOTH_FUZZ_SEED", "20261201"))
COUNT = int(os.environ.get("KUBESLOTH_FUZZ_COUNT", "320"))
BOUND_SECONDS = 60.0  # after the last create: 300+ objects reconciled on a 2-core machine shared with the suite
GROUP, VERSION, PLURAL = "kubesloth.io", "v1alpha1", "finetunejobs"

HUGE = "x" * 10_000
ODD = ["\u202eevil", "💥🦥", "\u0000nul", "é" * 70, "\ufeffbom", "a\nb", "  ", "", "ǅ", "\U0010ffff"]
NUMBERS = [2**63 - 1, 2**63, -(2**63), 2**31, 2**32, -1, 0, 1, 1e308, -1e308, 1.5, 0.0001, 1e-308]
WRONG = ["abc", "1", [], {}, True, None, [1, 2], {"a": 1}]
PATHS = ["..", "../x", "a/../../b", "pvc://outputs/../../etc", "pvc://../x", "s3://bucket/out", "s3://b/../c",
         "hf://org/../model", "file:///etc/passwd", "pvc://", "hf://", "pvc:///abs", "/abs/path", "pvc://c/a b"]
KEYS = ["bad key", "a/b/c", "-lead", "trail-", "x" * 64, "p" * 254 + "/n", "example.com/", "/name", "ok.io/ok",
        "UPPER", "dots..dots", "日本"]

LEAVES = {  # path -> what a valid value looks like (the generator mutates these)
    ("model", "source"): "str", ("model", "maxSeqLength"): "int", ("model", "architecture"): "enum",
    ("model", "tokenSecretRef", "name"): "str", ("model", "tokenSecretRef", "key"): "key",
    ("dataset", "source"): "str", ("dataset", "split"): "str", ("dataset", "format"): "enum",
    ("dataset", "textField"): "str", ("dataset", "packing"): "bool", ("dataset", "maxSamples"): "int",
    ("training", "profile"): "enum", ("training", "epochs"): "int", ("training", "maxSteps"): "int",
    ("training", "learningRate"): "float", ("training", "perDeviceBatchSize"): "int",
    ("training", "gradientAccumulationSteps"): "int", ("training", "optimizer"): "enum",
    ("training", "gradientCheckpointing"): "enum", ("training", "lrScheduler"): "enum",
    ("training", "warmupRatio"): "float", ("training", "weightDecay"): "float", ("training", "maxGradNorm"): "float",
    ("training", "seed"): "int", ("training", "loggingSteps"): "int",
    ("output", "destination"): "str", ("output", "checkpointEverySteps"): "int",
    ("output", "checkpointsToKeep"): "int",
    ("resources", "gpuProduct"): "str", ("resources", "gpuMemoryGiB"): "float", ("resources", "memory"): "str",
    ("resources", "cpu"): "str",
    ("priorityClassName",): "str", ("queueName",): "str", ("image",): "str", ("suspend",): "bool",
    ("activeDeadlineSeconds",): "int", ("backoffLimit",): "int", ("maxInterruptions",): "int",
    ("terminationGracePeriodSeconds",): "int", ("ttlSecondsAfterFinished",): "int",
}
MILD = [  # (path, value or rng -> value)
    (("resources", "gpuMemoryGiB"), 1e308), (("resources", "gpuMemoryGiB"), 1e-308), (("resources", "gpuMemoryGiB"), 0),
    (("resources", "gpuProduct"), lambda r: r.choice(ODD + [HUGE, "NVIDIA-H200", "../x"])),
    (("resources", "memory"), lambda r: r.choice(["1e308", "9223372036854775807", "1Ei", "0", "-1Gi", "1.5Gi"])),
    (("resources", "cpu"), lambda r: r.choice(["1e308", "0", "100000000", "0.0001", "-1"])),
    (("image",), lambda r: r.choice(ODD + [HUGE, "ghcr.io/kubesloth/trainer:0.1.0", "UPPER/case", "a@sha256:xyz"])),
    (("dataset", "split"), lambda r: r.choice(ODD + [HUGE])), (("dataset", "textField"), lambda r: r.choice(ODD)),
    (("dataset", "maxSamples"), lambda r: r.choice([2**63 - 1, 2**31 - 1, 0, 1])),
    (("model", "maxSeqLength"), lambda r: r.choice([2**63 - 1, 2**31 - 1, 1, 0])),
    (("training", "maxSteps"), lambda r: r.choice([2**63 - 1, 2**31 - 1, 1, 0])),
    (("training", "epochs"), lambda r: r.choice([2**63 - 1, 2**31 - 1, 1])),
    (("training", "perDeviceBatchSize"), lambda r: r.choice([2**63 - 1, 2**31 - 1, 1])),
    (("training", "gradientAccumulationSteps"), lambda r: r.choice([2**63 - 1, 2**31 - 1])),
    (("training", "learningRate"), lambda r: r.choice([1e-308, 0.999999, 5e-324])),
    (("training", "weightDecay"), lambda r: r.choice([1e308, 0.0])), (("training", "maxGradNorm"), 1e308),
    (("training", "warmupRatio"), lambda r: r.choice([0.0, 1.0])),
    (("training", "seed"), lambda r: r.choice([0, 4294967295])),
    (("training", "loggingSteps"), lambda r: r.choice([2**63 - 1, 1])),
    (("output", "checkpointEverySteps"), lambda r: r.choice([2**63 - 1, 1, 0])),
    (("output", "checkpointsToKeep"), lambda r: r.choice([2**63 - 1, 1, 0])),
    (("output", "destination"), lambda r: "pvc://outputs/" + r.choice(ODD[:3] + ["a" * 5000, "x/y/z", "."])),
    (("model", "source"), lambda r: r.choice(["hf://" + "a" * 5000, "hf://org/name💥", "pvc://models/" + HUGE])),
    (("activeDeadlineSeconds",), lambda r: r.choice([2147483647, 1, 0])),
    (("ttlSecondsAfterFinished",), lambda r: r.choice([2147483647, 0])),
    (("terminationGracePeriodSeconds",), lambda r: r.choice([2147483647, 0])),
    (("maxInterruptions",), lambda r: r.choice([2147483647, 0])), (("backoffLimit",), lambda r: r.choice([2147483647, 0])),
    (("suspend",), True), (("queueName",), lambda r: r.choice(["q", "a" * 63])),
    (("priorityClassName",), lambda r: r.choice(["does-not-exist", "a" * 253])),
    (("nodeSelector",), lambda r: {"ok.io/key": r.choice(["v", "a" * 63, ""])}),
    (("tolerations",), lambda r: [{"key": "k", "operator": "Exists", "effect": "NoExecute",
                                   "tolerationSeconds": r.choice([2147483647, 0, -1])}]),
    (("unknownField",), lambda r: r.choice(WRONG + [HUGE])),
    (("model", "tokenSecretRef"), lambda r: {"name": "missing", "key": r.choice(["token", "a" * 253, ".x"])}),
]
REQUIRED = [("model",), ("dataset",), ("output",), ("model", "source"), ("dataset", "source"),
            ("output", "destination")]


def _value(rng: random.Random, kind: str):
    pool = NUMBERS + WRONG + ODD + [HUGE]
    if kind == "str" or kind == "key":
        pool = ODD + PATHS + KEYS + [HUGE] * 3 + WRONG[2:] + NUMBERS[:3]
    elif kind == "enum":
        pool = ["LEAN", "lean ", "nope", "", HUGE] + ODD[:3] + WRONG
    return rng.choice(pool)


def _toleration(rng: random.Random) -> dict:
    tol = rng.choice([
        {"key": rng.choice(KEYS), "operator": "Exists", "effect": "NoSchedule"},
        {"key": "k", "operator": "Exists", "value": "v"},
        {"operator": "Equal", "value": "v"},
        {"key": "k", "operator": "Equal", "value": rng.choice(ODD + [HUGE, "x" * 64])},
        {"key": "k", "effect": "NoSchedule", "tolerationSeconds": 30},
        {"key": "k", "effect": "NoExecute", "tolerationSeconds": rng.choice(NUMBERS)},
        {"key": "k", "effect": rng.choice(["Nope", "", "noschedule"])},
        {"key": "k", "operator": rng.choice(["In", "exists", ""])},
        {"key": rng.choice(WRONG)},
        {"unknown": "field", "key": "k"},
    ])
    return tol


def mutate(rng: random.Random, index: int) -> tuple[dict, list[str]]:
    """A FineTuneJob with 1-3 mutations, and the names of the fields touched (a refusal must name one)."""
    body = finetunejob(f"fz-{index:04d}")
    spec = body["spec"]
    touched: list[str] = []
    if rng.random() < 0.4:  # plausible: values the door may well let in, so the operator gets to see them
        for _ in range(rng.randint(1, 3)):
            path, value = rng.choice(MILD)
            node = spec
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = value if not callable(value) else value(rng)
            touched.append(path[-1])
        return body, touched
    for _ in range(rng.randint(1, 3)):
        choice = rng.random()
        if choice < 0.55:
            path = rng.choice(list(LEAVES))
            node = spec
            for part in path[:-1]:
                if not isinstance(node.get(part), dict):
                    node[part] = {}
                node = node[part]
            node[path[-1]] = _value(rng, LEAVES[path])
            touched.append(path[-1])
        elif choice < 0.65:
            spec["tolerations"] = [_toleration(rng) for _ in range(rng.randint(1, 3))]
            if rng.random() < 0.1:
                spec["tolerations"] = [{"key": "k", "operator": "Exists"}] * 65
            touched += ["tolerations", "key", "value", "operator", "effect", "tolerationSeconds"]
        elif choice < 0.75:
            selector = {rng.choice(KEYS): rng.choice(ODD + KEYS + ["gpu", HUGE])}
            if rng.random() < 0.2:
                selector = {f"k{i}": "v" for i in range(65)}
            if rng.random() < 0.1:
                selector = rng.choice(WRONG)
            spec["nodeSelector"] = selector
            touched += ["nodeSelector"]
        elif choice < 0.82:
            path = rng.choice(REQUIRED)
            node = spec
            for part in path[:-1]:
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict):
                node.pop(path[-1], None)
            touched.append(path[-1])
        elif choice < 0.9:
            where = rng.choice([spec, body] + [spec[k] for k in ("training", "model") if isinstance(spec.get(k), dict)])
            where[rng.choice(["unknownField", "learning_rate", "suspended", HUGE[:300], "💥"])] = rng.choice(
                WRONG + NUMBERS[:2] + [HUGE])
            touched.append("unknown")  # dropped by v1.20: accepted
        else:
            section = rng.choice(["model", "dataset", "training", "output", "resources"])
            spec[section] = rng.choice(WRONG + [HUGE])
            touched.append(section)
    return body, touched


@pytest.fixture(scope="module")
def operator(cluster, tmp_path_factory):
    stack = Stack(cluster, tmp_path_factory.mktemp("fuzz"))
    stack.start_operator()  # no node agent: nothing is bound or run
    yield stack
    stack.stop()


def test_mutated_finetunejobs_are_refused_at_the_door_or_get_a_status(operator, cluster, namespace):
    rng = random.Random(SEED)
    bodies = [mutate(rng, i) for i in range(COUNT)]
    urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    api_client = kube_config.new_client_from_config(config_file=str(cluster.kubeconfig))
    custom, batch, core = (client.CustomObjectsApi(api_client), client.BatchV1Api(api_client),
                           client.CoreV1Api(api_client))

    def create(item):
        body, touched = item
        try:
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, copy.deepcopy(body),
                                                   _preload_content=False)
            return body["metadata"]["name"], None, touched
        except ApiException as err:
            return body["metadata"]["name"], err, touched

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(create, bodies))
    created_at = time.monotonic()
    accepted = {name for name, err, _ in results if err is None}
    problems = []
    for name, err, touched in results:
        if err is None:
            continue
        message = str(err.body or "")
        if err.status not in (400, 422) or not any(field in message for field in touched):
            problems.append(f"{name}: {err.status} does not name one of {touched}: {message[:400]}")
    assert not problems, f"seed {SEED}:\n" + "\n".join(problems[:20])
    print(f"seed {SEED}: {len(accepted)} of {COUNT} accepted by the API server")
    assert len(accepted) >= COUNT // 8, f"seed {SEED}: only {len(accepted)} accepted; the generator is too harsh"

    def listed():
        items = json.loads(custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL,
                                                                _preload_content=False).data)["items"]
        return {i["metadata"]["name"]: i.get("status") or {} for i in items}

    def without_status():
        statuses = listed()
        missing = sorted(n for n in accepted if not (statuses.get(n, {}).get("phase")
                                                     or statuses.get(n, {}).get("conditions")))
        return missing

    left = wait_for_quiet(without_status, BOUND_SECONDS)
    assert not left, f"seed {SEED}: no status within {BOUND_SECONDS:.0f} s: {left[:20]}\n{operator.logs()}"
    assert time.monotonic() - created_at <= BOUND_SECONDS + 5

    # A child only ever with a status (and only for one the operator accepted: a refusal creates nothing).
    statuses = listed()
    jobs = json.loads(batch.list_namespaced_job(namespace, _preload_content=False).data)["items"]
    configmaps = json.loads(core.list_namespaced_config_map(namespace, label_selector="kubesloth.io/finetunejob",
                                                            _preload_content=False).data)["items"]
    for child in jobs + configmaps:
        owner = child["metadata"]["annotations"]["kubesloth.io/finetunejob"]
        assert statuses.get(owner, {}).get("phase"), f"seed {SEED}: {child['kind']} of {owner} without a status"
        running = next((c for c in statuses[owner].get("conditions") or [] if c["type"] == "Running"), {})
        assert running.get("reason") not in ("InvalidSpec", "JobRefused", "ConfigMapRefused", "ImageNotAllowed"), (
            f"seed {SEED}: {owner} refused ({running}) yet has a {child['kind']}")

    log = operator.operator.log_path.read_text(errors="replace")
    assert "Traceback" not in log, f"seed {SEED}: operator traceback:\n" + log[log.index("Traceback") - 2000:][:6000]
    assert operator.operator.proc.poll() is None, "the operator exited"


def wait_for_quiet(probe, timeout: float) -> list:
    """`probe()` until it returns an empty list or `timeout` passes; the last answer."""
    deadline = time.monotonic() + timeout
    left = probe()
    while left and time.monotonic() < deadline:
        time.sleep(1.0)
        left = probe()
    return left


def test_the_generator_is_seeded_and_covers_the_classes():
    def generate(count):
        rng = random.Random(SEED)
        return [mutate(rng, i)[0] for i in range(count)]

    assert generate(50) == generate(50)
    text = json.dumps(generate(COUNT))
    for needle in ("9223372036854775807", "1e+308", "s3://", "..", HUGE, "tolerations", "nodeSelector",
                   "unknownField", "\\u202e"):
        assert needle in text, needle
    assert COUNT >= 300
