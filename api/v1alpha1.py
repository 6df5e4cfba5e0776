"""FineTuneJob v1alpha1: the single source of the CRD schema, the operator's view and the trainer's config.

Attribute names are snake_case in Python and camelCase on the wire (the contract in docs/api.md). Every field
carries a description: it becomes the CRD's documentation (`kubectl explain ftj.spec...`).
Only stdlib and pydantic may be imported here (tests/test_layers.py enforces it).
"""

from __future__ import annotations

import enum
import re
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic.alias_generators import to_camel

from kubesloth.api import contract

GROUP = "kubesloth.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ["ftj"]
CATEGORIES = ["kubesloth", "ml"]

# RE2-compatible (the API server validates `pattern` with Go's regexp): no look-arounds.
# A path segment that is not `..` (the trainer maps pvc:// and file:// paths onto the file system; a `..` would
# leave the volume): empty segments and `.` are harmless, `...` is a name.
_SEGMENT = r"(\.?[^\s/.][^\s/]*|\.\.[^\s/]+|\.)?"
_PATH = rf"(/{_SEGMENT})*"
_CLAIM = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
# Hugging Face repo ids start and end alphanumeric and never hold `..` (huggingface_hub validate_repo_id);
# a revision is a git ref or commit (git forbids `..` and components starting with `.`).
_HF_PART = r"[A-Za-z0-9]([A-Za-z0-9_-]|\.[A-Za-z0-9_-])*"
_HF_REVISION = r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*(/[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*)*"
SOURCE_PATTERN = (
    rf"^(hf://{_HF_PART}(/{_HF_PART})?(@{_HF_REVISION})?"
    rf"|pvc://{_CLAIM}{_PATH}"
    rf"|s3://[a-z0-9][a-z0-9.-]{{1,61}}[a-z0-9]{_PATH}"
    rf"|file://{_PATH})$"
)
# No s3:// (the trainer cannot write checkpoints atomically to an object store and refuses it, exit 2). file:// is
# for the trainer run outside a pod (the same types); in a pod the operator builds, nothing but pvc:// claims is a
# volume, so the operator refuses a file:// destination (docs/operator.md) instead of losing the model.
DESTINATION_PATTERN = rf"^(pvc://{_CLAIM}{_PATH}|file://{_PATH})$"
# Kubernetes' own syntax (k8s.io/apimachinery/pkg/util/validation): a label value (IsValidLabelValue, <= 63,
# may be empty), the name part of a qualified name (label key, toleration key: IsQualifiedName), a ConfigMap or
# Secret key (IsConfigMapKey: [-._a-zA-Z0-9]+, <= 253, not `.`, `..` or starting with `..`).
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
_QUALIFIED_NAME = r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
_DNS_SUBDOMAIN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
QUALIFIED_NAME_PATTERN = rf"^(({_DNS_SUBDOMAIN}/)?{_QUALIFIED_NAME})?$"  # empty: a toleration of every key
# The lengths, as a second pattern (an allOf in the CRD): prefix <= 253, name <= 63, so at most 317 in all.
QUALIFIED_NAME_LENGTHS = r"^(([^/]{1,253}/)?[^/]{1,63})?$"
QUALIFIED_NAME_MAX = 253 + 1 + 63
CONFIG_KEY_PATTERN = r"^\.?[-_a-zA-Z0-9][-._a-zA-Z0-9]*$"
# spec.dataset: a datasets config name (the hub's `configs:` names, e.g. 20231101.en) and dataDir, a relative path
# inside the source without `..` segments.
DATASET_CONFIG_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+-]*$"
_REL_SEGMENT = r"(\.?[^\s/.][^\s/]*|\.\.[^\s/]+)"
DATA_DIR_PATTERN = rf"^{_REL_SEGMENT}(/{_REL_SEGMENT})*/?$"
# spec.output.pushToHub.repository: ORG/NAME, a hub repo id (huggingface_hub validate_repo_id: <= 96).
HUB_REPO_PATTERN = rf"^{_HF_PART}/{_HF_PART}$"
# The env var the operator sets from spec.output.pushToHub.tokenSecretRef (never logged).
HUB_PUSH_TOKEN_ENV = "KUBESLOTH_HUB_PUSH_TOKEN"
# Integer bounds. Counts and seconds: int32 (Kubernetes' own Job.spec.ttlSecondsAfterFinished is an int32;
# activeDeadlineSeconds and tolerationSeconds become a Go time.Duration of nanoseconds in the Job controller and
# the taint manager, which overflows above 9223372036 s and fires at once; Python's datetime + timedelta
# overflows past the year 9999). 2**31-1 s is 68 years, below all of them. The seed: numpy (transformers'
# set_seed seeds it) takes 0..2**32-1 only.
INT32_MAX = 2**31 - 1
SEED_MAX = 2**32 - 1
QUANTITY_PATTERN = r"^([0-9]+(\.[0-9]+)?|\.[0-9]+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"

# spec.env / envFrom / volumes / volumeMounts (per-job pod settings). Env var names: C identifiers (a subset of what
# every Kubernetes version accepts, IsEnvVarName; usable from a shell and Python alike), <= 128; the contract's,
# the operator's and code-loading names are refused (contract.RESERVED_ENV_*). Volume names: DNS-1123 labels that are
# not the pod's own (contract.RESERVED_VOLUME_*). Mount paths: under contract.MOUNT_ROOT, not under PVC_ROOT, no
# `.`/`..`/empty segments.
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
ENV_NAME_MAX = 128
ENV_VALUE_MAX = 32768
RESERVED_ENV_PATTERN = ("^(" + "|".join(f"{re.escape(p)}.*" for p in contract.RESERVED_ENV_PREFIXES) + "|"
                        + "|".join(contract.RESERVED_ENV_NAMES) + ")$")
RESERVED_VOLUME_PATTERN = ("^(" + "|".join(contract.RESERVED_VOLUME_NAMES) + "|"
                           + contract.RESERVED_VOLUME_PREFIX + ".*)$")
_MOUNT_SEGMENT = r"[A-Za-z0-9_][-A-Za-z0-9_.]*"
MOUNT_PATH_PATTERN = rf"^{re.escape(contract.MOUNT_ROOT)}(/{_MOUNT_SEGMENT})+$"
RESERVED_MOUNT_PATTERN = rf"^{re.escape(contract.PVC_ROOT)}(/.*)?$"
MOUNT_PATH_MAX = 512
# Kubernetes expands $(NAME) in env values with the variables before them: a value may not carry the tokens the
# operator put there (spec.model.tokenSecretRef, pushToHub) into, say, a tracker URL of the user's choosing.
TOKEN_ENV_NAMES = (contract.Env.HF_TOKEN.value, HUB_PUSH_TOKEN_ENV)
TOKEN_REFERENCE_PATTERN = r"\$\((" + "|".join(TOKEN_ENV_NAMES) + r")\)"


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=True,
        validate_default=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """The camelCase dict the API server stores (unset optional fields left out)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class ModelArchitecture(str, enum.Enum):
    """Known shapes (kubesloth.planner.shapes.KNOWN_SHAPES; a test keeps the two lists equal)."""

    llama_3_1_8b = "llama-3.1-8b"
    llama_3_2_3b = "llama-3.2-3b"
    llama_3_2_1b = "llama-3.2-1b"
    qwen2_5_7b = "qwen2.5-7b"
    qwen2_5_3b = "qwen2.5-3b"
    qwen2_5_1_5b = "qwen2.5-1.5b"
    qwen2_5_0_5b = "qwen2.5-0.5b"
    mistral_7b_v0_3 = "mistral-7b-v0.3"


class DatasetFormat(str, enum.Enum):
    alpaca = "alpaca"
    chat = "chat"
    text = "text"


class Profile(str, enum.Enum):
    auto = "auto"
    lean = "lean"
    fast = "fast"
    custom = "custom"


class Optimizer(str, enum.Enum):
    paged_adamw_8bit = "paged_adamw_8bit"
    adamw_8bit = "adamw_8bit"
    paged_adamw_32bit = "paged_adamw_32bit"
    adamw_torch = "adamw_torch"
    adamw_torch_fused = "adamw_torch_fused"
    adafactor = "adafactor"
    sgd = "sgd"


class GradientCheckpointing(str, enum.Enum):
    unsloth = "unsloth"
    true = "true"
    false = "false"


class LRScheduler(str, enum.Enum):
    linear = "linear"
    cosine = "cosine"
    constant = "constant"
    constant_with_warmup = "constant_with_warmup"
    cosine_with_restarts = "cosine_with_restarts"
    polynomial = "polynomial"


class Tracker(str, enum.Enum):
    tensorboard = "tensorboard"
    wandb = "wandb"
    mlflow = "mlflow"


class Phase(str, enum.Enum):
    Pending = "Pending"
    Queued = "Queued"
    Running = "Running"
    Succeeded = "Succeeded"
    Failed = "Failed"
    Suspended = "Suspended"


FINISHED_PHASES = frozenset({Phase.Succeeded.value, Phase.Failed.value})


class SecretKeyRef(_Model):
    name: Annotated[str, Field(description="Name of a Secret in the FineTuneJob's namespace.",
                               pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)]
    key: Annotated[str, Field(description="Key in the Secret that holds the token ([-._a-zA-Z0-9]+, not `.`, "
                                          "`..` or starting with `..`; a Secret key's syntax).",
                              min_length=1, max_length=253, pattern=CONFIG_KEY_PATTERN)] = "token"


class ModelSpec(_Model):
    source: Annotated[str, Field(
        description="Where the base model is: hf://ORG/NAME[@revision], pvc://CLAIM/path, s3://bucket/prefix "
                    "or file:///path (a directory with config.json, tokenizer and safetensors weights).",
        pattern=SOURCE_PATTERN)]
    token_secret_ref: Annotated[Optional[SecretKeyRef], Field(
        description="Secret holding a Hugging Face token for gated models. Passed to the pod as an env var "
                    "from the Secret; never copied into the ConfigMap, status, events or logs.")] = None
    max_seq_length: Annotated[int, Field(
        description="Longest sequence in tokens; longer examples are truncated.", ge=16, le=131072)] = 2048
    architecture: Annotated[Optional[ModelArchitecture], Field(
        description="The model's shape by name, for the memory planner when the operator cannot read the "
                    "model's config.json (a pvc:// model on a real cluster). Unset: read from config.json "
                    "(hf:// through the hub client, file:// and pvc:// where the operator can see them), else "
                    "a known hub name, else the estimate is made in the pod.")] = None


class DatasetSpec(_Model):
    source: Annotated[str, Field(
        description="Where the data is: hf://ORG/NAME[@revision] (only the split's files are downloaded), "
                    "pvc://CLAIM/path, s3://bucket/prefix (s3fs: in the trainer image; a custom image needs "
                    "kubesloth[s3]) or file:///path: a .jsonl, .json, .parquet or .csv file (optionally .gz, .bz2, "
                    ".xz, .zst or .lz4 compressed), or a directory of them (files naming the split are that split, as "
                    "datasets.load_dataset reads them).",
        pattern=SOURCE_PATTERN)]
    split: Annotated[str, Field(description="Dataset split to train on.", min_length=1)] = "train"
    format: Annotated[DatasetFormat, Field(
        description="alpaca: instruction/input/output records; chat: a `messages` list rendered with the "
                    "tokenizer's chat template; text: one text field per record.")] = DatasetFormat.alpaca
    text_field: Annotated[str, Field(description="Record field holding the text, for format: text.",
                                     min_length=1)] = "text"
    packing: Annotated[bool, Field(
        description="Pack several short examples into one sequence (padding-free, examples kept apart).")] = False
    max_samples: Annotated[Optional[int], Field(
        description="Use only the first N records (smoke tests, demos); an hf:// or s3:// source is then "
                    "streamed and only those records are read.", ge=1, le=INT32_MAX)] = None
    config: Annotated[Optional[str], Field(
        description="The dataset's configuration (subset) name, for hf:// datasets with several (e.g. "
                    "20231101.en) and local dataset repos with `configs` in their README.",
        max_length=128, pattern=DATASET_CONFIG_PATTERN)] = None
    data_dir: Annotated[Optional[str], Field(
        description="A directory inside the source to read the data files from (relative, no `..`).",
        max_length=1024, pattern=DATA_DIR_PATTERN)] = None


class TrainingSpec(_Model):
    profile: Annotated[Profile, Field(
        description="auto: pick what fits the GPU's memory; lean: least memory (8-bit paged optimizer, "
                    "offloaded checkpointing); fast: highest throughput that fits; custom: the fields below "
                    "exactly as given.")] = Profile.auto
    epochs: Annotated[int, Field(description="Passes over the dataset (ignored when maxSteps is set).",
                                 ge=1, le=1000)] = 1
    max_steps: Annotated[Optional[int], Field(
        description="Stop after this many optimizer steps; overrides epochs.", ge=1, le=INT32_MAX)] = None
    learning_rate: Annotated[float, Field(description="Peak learning rate; must be > 0 and < 1.",
                                          gt=0, lt=1)] = 2.0e-5
    per_device_batch_size: Annotated[Optional[int], Field(
        description="Sequences per forward pass. Unset: the memory planner picks the sequences per step (about "
                    "16k tokens a step, at most 8 sequences) under profiles auto/lean/fast; 1 under custom. Set: "
                    "perDeviceBatchSize x gradientAccumulationSteps sequences make each optimizer step, or the "
                    "job is refused with the largest batch that fits.", ge=1, le=1024)] = None
    gradient_accumulation_steps: Annotated[Optional[int], Field(
        description="Forward/backward passes per optimizer step. Unset: 1 under auto/lean/fast, 4 under custom. "
                    "The fused engine (auto/lean/fast on a GPU) runs the same sequences in one pass "
                    "(status.estimate.changes says so).", ge=1, le=1024)] = None
    optimizer: Annotated[Optional[Optimizer], Field(
        description="Optimizer. Unset: the profile's (8-bit AdamW with states where the planner fits them; "
                    "paged_adamw_8bit under custom). Set: honoured, or the job is refused with a reason; 8-bit "
                    "and paged variants need a GPU (the CPU engine maps them to adamw_torch).")] = None
    gradient_checkpointing: Annotated[Optional[GradientCheckpointing], Field(
        description='Activation checkpointing: "unsloth" (offloaded to host memory), "true" or "false" (a '
                    "string, not a YAML boolean). Unset: unsloth, with as many layers left uncheckpointed as "
                    "the budget allows under auto/fast.")] = None
    lr_scheduler: Annotated[LRScheduler, Field(description="Learning-rate schedule.")] = LRScheduler.linear
    warmup_ratio: Annotated[float, Field(description="Fraction of steps spent warming up, 0 to 1.",
                                         ge=0, le=1)] = 0.03
    weight_decay: Annotated[float, Field(description="AdamW weight decay, >= 0.", ge=0)] = 0.0
    max_grad_norm: Annotated[float, Field(description="Gradient clipping norm; 0 turns clipping off.",
                                          ge=0)] = 1.0
    seed: Annotated[int, Field(description="Random seed for data order and initialisation (numpy's range).",
                               ge=0, le=SEED_MAX)] = 3407
    logging_steps: Annotated[int, Field(description="Log and publish progress every N steps.", ge=1,
                                        le=INT32_MAX)] = 1
    report_to: Annotated[Optional[list[Tracker]], Field(
        description="Experiment trackers that get every logging step (loss, learning rate, tokens/s, grad norm, "
                    "memory): tensorboard (event files under <destination>/tensorboard/), wandb, mlflow (their "
                    "own WANDB_*/MLFLOW_* env vars; the package must be in the trainer image: on the install's "
                    "image, one it lacks is refused before anything is created (TrackerNotInImage; the chart's "
                    "trainer.imageTrackers), on an image of spec.image the trainer refuses it at start). Each at "
                    "most once; default none.",
        max_length=3)] = None

    @field_validator("report_to")
    @classmethod
    def _unique_trackers(cls, value: Optional[list]) -> Optional[list]:
        names = [str(getattr(v, "value", v)) for v in value or []]
        if len(set(names)) != len(names):
            raise ValueError(f"each tracker at most once: {names}")
        return value


class PushToHubSpec(_Model):
    repository: Annotated[str, Field(description="The model repository, ORG/NAME (created if missing).",
                                     max_length=96, pattern=HUB_REPO_PATTERN)]
    token_secret_ref: Annotated[SecretKeyRef, Field(
        description="Secret holding a Hugging Face token with write access; passed to the pod as an env var, "
                    "never copied into the ConfigMap, status, events or logs.")]
    private: Annotated[bool, Field(description="Create the repository private (an existing one keeps its "
                                               "visibility).")] = True


class OnExisting(str, enum.Enum):
    refuse = "refuse"
    resume = "resume"
    restart = "restart"


class OutputSpec(_Model):
    destination: Annotated[str, Field(
        description="Where checkpoints and the final model go: pvc://CLAIM/path (no `..` segments). file:///path "
                    "only for the trainer run outside a pod: the operator refuses it (a pod's file system is lost "
                    "with the pod).", pattern=DESTINATION_PATTERN)]
    checkpoint_every_steps: Annotated[int, Field(
        description="Write a resumable checkpoint every N optimizer steps.", ge=1, le=INT32_MAX)] = 200
    checkpoints_to_keep: Annotated[int, Field(description="Newest checkpoints kept; older ones are deleted.",
                                              ge=1, le=100)] = 2
    on_existing: Annotated[OnExisting, Field(
        description="What the trainer does when the destination holds checkpoints or a model of another run (a "
                    "FineTuneJob deleted and recreated, or another spec: checkpoints record the FineTuneJob's uid "
                    "and a hash of the fields that change training). refuse: exit with OutputInUse, naming the "
                    "fields that differ; resume: continue the newest checkpoint when the model shape matches "
                    "(the way to continue after a delete and recreate); restart: move the old checkpoints, model "
                    "and summary aside to superseded/ (nothing is deleted) and start fresh.")] = "refuse"
    push_to_hub: Annotated[Optional[PushToHubSpec], Field(
        description="Upload the verified model (and its model card) to a Hugging Face Hub model repository "
                    "after the save.")] = None


class ResourcesSpec(_Model):
    gpu_product: Annotated[Optional[str], Field(
        description="Required GPU model, matched against the node label nvidia.com/gpu.product "
                    "(e.g. NVIDIA-L40S, NVIDIA-H100-80GB-HBM3).", max_length=63,
        pattern=r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")] = None
    gpu_memory_gi_b: Annotated[Optional[float], Field(
        alias="gpuMemoryGiB", description="GPU memory in GiB the run must fit into (used by profile auto).",
        gt=0, le=4096)] = None
    memory: Annotated[Optional[str], Field(
        description="Host memory request and limit (a Kubernetes quantity, e.g. 64Gi).",
        pattern=QUANTITY_PATTERN)] = None
    cpu: Annotated[Optional[str], Field(description="CPU request (a Kubernetes quantity, e.g. \"8\" or 500m).",
                                        pattern=QUANTITY_PATTERN)] = None


def qualified_name_problem(value: str) -> str | None:
    """Why `value` is no Kubernetes qualified name (label key, toleration key), as IsQualifiedName says; None if it
    is one."""
    prefix, slash, name = value.rpartition("/")
    if not re.fullmatch(_QUALIFIED_NAME, name) or len(name) > 63:
        return ("the name part must be 1-63 characters, alphanumeric, '-', '_' or '.', starting and ending "
                "alphanumeric")
    if slash and (not re.fullmatch(_DNS_SUBDOMAIN, prefix) or len(prefix) > 253):
        return "the prefix must be a DNS subdomain (lowercase alphanumeric, '-' or '.') of at most 253 characters"
    return None


def _qualified_name(value: Optional[str]) -> Optional[str]:
    if value:
        problem = qualified_name_problem(value)
        if problem:
            raise ValueError(f"{value[:80]!r} is not a qualified name: {problem}")
    return value


# The toleration rules Kubernetes checks across fields (validateTolerations), as structural-schema value
# validations (anyOf/not/required: v1.20 has them, no CEL needed) and again in Python below.
_TOLERATION_RULES = [
    # operator Exists => no value
    {"anyOf": [{"not": {"required": ["value"]}}, {"properties": {"value": {"maxLength": 0}}},
               {"properties": {"operator": {"enum": ["Equal"]}}}]},
    # no key => operator Exists (match every taint)
    {"anyOf": [{"required": ["key"], "properties": {"key": {"minLength": 1}}},
               {"required": ["operator"], "properties": {"operator": {"enum": ["Exists"]}}}]},
    # tolerationSeconds => effect NoExecute
    {"anyOf": [{"not": {"required": ["tolerationSeconds"]}},
               {"required": ["effect"], "properties": {"effect": {"enum": ["NoExecute"]}}}]},
]


class Toleration(_Model):
    """A pod toleration, validated as Kubernetes validates it (the Job would be rejected otherwise)."""

    model_config = ConfigDict(json_schema_extra={"allOf": _TOLERATION_RULES})
    key: Annotated[Optional[str], Field(
        description="Taint key the toleration applies to: a qualified name ([prefix/]name, prefix a DNS "
                    "subdomain <= 253, name <= 63). Empty matches every key, with operator Exists.",
        max_length=QUALIFIED_NAME_MAX, pattern=QUALIFIED_NAME_PATTERN,
        json_schema_extra={"allOf": [{"pattern": QUALIFIED_NAME_LENGTHS}]})] = None
    operator: Annotated[Optional[Literal["Exists", "Equal"]], Field(
        description="Exists or Equal (the default); Exists needs no value and takes none.")] = None
    value: Annotated[Optional[str], Field(description="Taint value, for operator Equal (a label value, <= 63).",
                                          max_length=63, pattern=LABEL_VALUE_PATTERN)] = None
    effect: Annotated[Optional[Literal["NoSchedule", "PreferNoSchedule", "NoExecute"]], Field(
        description="Taint effect to match; empty matches all.")] = None
    toleration_seconds: Annotated[Optional[int], Field(
        description="Only with effect NoExecute: how long the pod stays bound after the taint appears.",
        ge=0, le=INT32_MAX)] = None

    _key = field_validator("key")(_qualified_name)

    @field_validator("operator")
    @classmethod
    def _no_key_means_exists(cls, value: Optional[str], info: ValidationInfo) -> Optional[str]:
        if not info.data.get("key") and value != "Exists" and "key" in info.data:
            raise ValueError("operator must be Exists when key is empty (which matches every taint)")
        return value

    @field_validator("value")
    @classmethod
    def _exists_takes_no_value(cls, value: Optional[str], info: ValidationInfo) -> Optional[str]:
        if value and info.data.get("operator") == "Exists":
            raise ValueError("value must be empty when operator is Exists")
        return value

    @field_validator("toleration_seconds")
    @classmethod
    def _seconds_need_no_execute(cls, value: Optional[int], info: ValidationInfo) -> Optional[int]:
        if value is not None and info.data.get("effect") != "NoExecute":
            raise ValueError("tolerationSeconds is only allowed with effect NoExecute")
        return value



def _not(pattern: str) -> dict[str, Any]:
    """A CRD value validation: the string must not match `pattern` (an allOf junctor; the server names the field)."""
    return {"allOf": [{"not": {"pattern": pattern}}]}


def _exactly_one(*wire_names: str) -> dict[str, Any]:
    return {"allOf": [{"oneOf": [{"required": [name]} for name in wire_names]}]}


def _one_of(model: BaseModel, names: tuple[str, ...], where: str) -> None:
    given = [name for name in names if getattr(model, name) is not None]
    if len(given) != 1:
        wire = [to_camel(name) for name in names]
        raise ValueError(f"{where}: exactly one of {', '.join(wire)} (given: {', '.join(map(to_camel, given)) or 'none'})")


_SECRET_NAME = Field(description="Name of a Secret in the FineTuneJob's namespace (a DNS subdomain, <= 253).",
                     pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)
_CONFIGMAP_NAME = Field(description="Name of a ConfigMap in the FineTuneJob's namespace (a DNS subdomain, <= 253).",
                        pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)
_KEY = Field(description="The key ([-._a-zA-Z0-9]+, <= 253, not `.`, `..` or starting with `..`).",
             min_length=1, max_length=253, pattern=CONFIG_KEY_PATTERN)
_OPTIONAL = Field(description="true: the pod starts without it when it is missing (Kubernetes' optional).")


class EnvSecretKeyRef(_Model):
    name: Annotated[str, _SECRET_NAME]
    key: Annotated[str, _KEY]
    optional: Annotated[Optional[bool], _OPTIONAL] = None


class EnvConfigMapKeyRef(_Model):
    name: Annotated[str, _CONFIGMAP_NAME]
    key: Annotated[str, _KEY]
    optional: Annotated[Optional[bool], _OPTIONAL] = None


class EnvVarSource(_Model):
    model_config = ConfigDict(json_schema_extra=_exactly_one("secretKeyRef", "configMapKeyRef"))
    secret_key_ref: Annotated[Optional[EnvSecretKeyRef], Field(
        description="A key of a Secret (only where the operator's trainer.jobPodSettings.secrets is true).")] = None
    config_map_key_ref: Annotated[Optional[EnvConfigMapKeyRef], Field(description="A key of a ConfigMap.")] = None

    @model_validator(mode="after")
    def _one_source(self) -> "EnvVarSource":
        _one_of(self, ("secret_key_ref", "config_map_key_ref"), "valueFrom")
        return self


class EnvVar(_Model):
    model_config = ConfigDict(json_schema_extra={"allOf": [{"not": {"required": ["value", "valueFrom"]}}]})
    name: Annotated[str, Field(
        description="Variable name: a C identifier ([A-Za-z_][A-Za-z0-9_]*, <= 128). Refused: KUBESLOTH_* and LD_*, "
                    "and " + ", ".join(contract.RESERVED_ENV_NAMES) + " (the trainer contract's, the operator's own, "
                    "and names that load other code or send the tokens elsewhere; a Hugging Face token goes in "
                    "spec.model.tokenSecretRef).",
        max_length=ENV_NAME_MAX, pattern=ENV_NAME_PATTERN, json_schema_extra=_not(RESERVED_ENV_PATTERN))]
    value: Annotated[Optional[str], Field(description="A literal value (<= 32768 characters); $(NAME) refers to "
                                                      "an earlier variable, as Kubernetes expands it, except "
                                                      + " and ".join(f"$({n})" for n in TOKEN_ENV_NAMES)
                                                      + " (the tokens stay where the operator put them).",
                                          max_length=ENV_VALUE_MAX,
                                          json_schema_extra=_not(TOKEN_REFERENCE_PATTERN))] = None
    value_from: Annotated[Optional[EnvVarSource], Field(
        description="The value from a Secret or ConfigMap key instead of `value` (not both).")] = None

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if contract.reserved_env_name(value):
            raise ValueError(f"{value!r} is reserved (KUBESLOTH_*, LD_*, {', '.join(contract.RESERVED_ENV_NAMES)})")
        return value

    @field_validator("value")
    @classmethod
    def _no_token_reference(cls, value: Optional[str]) -> Optional[str]:
        if value and re.search(TOKEN_REFERENCE_PATTERN, value):
            raise ValueError(f"may not refer to {' or '.join(TOKEN_ENV_NAMES)} (the tokens stay where the operator "
                             "put them)")
        return value

    @model_validator(mode="after")
    def _value_or_source(self) -> "EnvVar":
        if self.value is not None and self.value_from is not None:
            raise ValueError(f"env {self.name}: value and valueFrom are exclusive")
        return self


class EnvFromSecretRef(_Model):
    name: Annotated[str, _SECRET_NAME]
    optional: Annotated[Optional[bool], _OPTIONAL] = None


class EnvFromConfigMapRef(_Model):
    name: Annotated[str, _CONFIGMAP_NAME]
    optional: Annotated[Optional[bool], _OPTIONAL] = None


class EnvFromSource(_Model):
    model_config = ConfigDict(json_schema_extra=_exactly_one("secretRef", "configMapRef"))
    prefix: Annotated[Optional[str], Field(
        description="Prepended to every key (a C identifier, <= 64).", max_length=64,
        pattern=ENV_NAME_PATTERN)] = None
    secret_ref: Annotated[Optional[EnvFromSecretRef], Field(
        description="Every key of a Secret (only where the operator's trainer.jobPodSettings.secrets is "
                    "true).")] = None
    config_map_ref: Annotated[Optional[EnvFromConfigMapRef], Field(description="Every key of a ConfigMap.")] = None

    @model_validator(mode="after")
    def _one_source(self) -> "EnvFromSource":
        _one_of(self, ("secret_ref", "config_map_ref"), "envFrom")
        return self


class PVCVolumeSource(_Model):
    claim_name: Annotated[str, Field(description="A PersistentVolumeClaim in the FineTuneJob's namespace (a DNS "
                                                 "subdomain, <= 253).",
                                     pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)]
    read_only: Annotated[Optional[bool], Field(description="Mount the claim read-only.")] = None


class ConfigMapVolumeSource(_Model):
    name: Annotated[str, _CONFIGMAP_NAME]
    optional: Annotated[Optional[bool], _OPTIONAL] = None


class SecretVolumeSource(_Model):
    secret_name: Annotated[str, _SECRET_NAME]
    optional: Annotated[Optional[bool], _OPTIONAL] = None


class EmptyDirVolumeSource(_Model):
    medium: Annotated[Optional[Literal["", "Memory"]], Field(
        description='"" (the node\'s disk) or Memory (tmpfs, counted against the pod\'s memory).')] = None
    size_limit: Annotated[Optional[str], Field(description="At most this much (a Kubernetes quantity, e.g. 10Gi).",
                                               pattern=QUANTITY_PATTERN)] = None


_VOLUME_SOURCES = ("persistent_volume_claim", "config_map", "secret", "empty_dir")


class Volume(_Model):
    model_config = ConfigDict(json_schema_extra=_exactly_one(*(to_camel(n) for n in _VOLUME_SOURCES)))
    name: Annotated[str, Field(
        description="Volume name (a DNS-1123 label, <= 63), unique; not " + ", ".join(contract.RESERVED_VOLUME_NAMES)
                    + " or pvc-* (the trainer pod's own volumes).",
        max_length=63, pattern=DNS_LABEL_PATTERN, json_schema_extra=_not(RESERVED_VOLUME_PATTERN))]
    persistent_volume_claim: Annotated[Optional[PVCVolumeSource], Field(description="A PersistentVolumeClaim.")] = None
    config_map: Annotated[Optional[ConfigMapVolumeSource], Field(description="A ConfigMap's keys as files.")] = None
    secret: Annotated[Optional[SecretVolumeSource], Field(
        description="A Secret's keys as files (only where the operator's trainer.jobPodSettings.secrets is "
                    "true).")] = None
    empty_dir: Annotated[Optional[EmptyDirVolumeSource], Field(description="Scratch space that lives with the pod.")
                         ] = None

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value in contract.RESERVED_VOLUME_NAMES or value.startswith(contract.RESERVED_VOLUME_PREFIX):
            raise ValueError(f"{value!r} is the name of one of the trainer pod's own volumes")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> "Volume":
        _one_of(self, _VOLUME_SOURCES, f"volume {self.name}")
        return self


class VolumeMount(_Model):
    name: Annotated[str, Field(description="The spec.volumes entry to mount.", max_length=63,
                               pattern=DNS_LABEL_PATTERN)]
    mount_path: Annotated[str, Field(
        description=f"Where in the trainer container: under {contract.MOUNT_ROOT}/ (never over the image's code or "
                    f"the trainer's own paths), not under {contract.PVC_ROOT} (the pvc:// claims); no `.`, `..` or "
                    "empty segments, <= 512; unique.",
        max_length=MOUNT_PATH_MAX, pattern=MOUNT_PATH_PATTERN, json_schema_extra=_not(RESERVED_MOUNT_PATTERN))]
    read_only: Annotated[Optional[bool], Field(description="Mount read-only.")] = None

    @field_validator("mount_path")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if re.fullmatch(RESERVED_MOUNT_PATTERN[1:-1], value):
            raise ValueError(f"{value!r} is under {contract.PVC_ROOT}, where the operator mounts the pvc:// claims")
        return value


def _unique(items: Optional[list], attribute: str, what: str) -> Optional[list]:
    seen: set[str] = set()
    for index, item in enumerate(items or []):
        value = getattr(item, attribute)
        if value in seen:
            raise ValueError(f"[{index}]: {what} {value!r} appears twice")
        seen.add(value)
    return items


class CacheSpec(_Model):
    volume_claim_name: Annotated[Optional[str], Field(
        description="PersistentVolumeClaim (of the FineTuneJob's namespace) mounted at the trainer's cache "
                    "directory instead of an emptyDir: hub downloads and the Unsloth / inductor / Triton compile "
                    "caches survive a restart, so a resumed pod does not download the model again. ReadWriteMany "
                    "to share it between jobs on several nodes. Default: the operator's trainer.cacheVolumeClaim, "
                    "else an emptyDir (an ephemeral-storage request sized for the hub download).",
        pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)] = None


class FineTuneJobSpec(_Model):
    model: Annotated[ModelSpec, Field(description="The base model to fine-tune (every weight is trained).")]
    dataset: Annotated[DatasetSpec, Field(description="The training data.")]
    training: Annotated[TrainingSpec, Field(description="Hyperparameters and the profile.",
                                            default_factory=TrainingSpec)]
    output: Annotated[OutputSpec, Field(description="Where checkpoints and the trained model are written.")]
    resources: Annotated[ResourcesSpec, Field(description="What the single-GPU pod asks for.",
                                              default_factory=ResourcesSpec)]
    node_selector: Annotated[dict[str, Annotated[str, Field(max_length=63, pattern=LABEL_VALUE_PATTERN)]], Field(
        description="Extra node labels the pod must match: keys are label keys ([prefix/]name; the operator checks "
                    "them, a v1.20 schema cannot), values label values (<= 63). At most 64.",
        default_factory=dict, max_length=64)]
    tolerations: Annotated[list[Toleration], Field(description="Tolerations added to the pod (e.g. GPU taints); "
                                                               "at most 64.",
                                                   default_factory=list, max_length=64)]
    priority_class_name: Annotated[Optional[str], Field(description="PriorityClass of the pod (a DNS subdomain, "
                                                                    "<= 253).",
                                                        pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)] = None
    queue_name: Annotated[Optional[str], Field(
        description="Kueue LocalQueue: the Job gets label kueue.x-k8s.io/queue-name (so <= 63, a label value) and "
                    "is created suspended for Kueue to admit.", pattern=DNS_SUBDOMAIN_PATTERN, max_length=63)] = None
    image: Annotated[Optional[str], Field(description="Trainer image; overrides the operator's default.",
                                          min_length=1)] = None
    env: Annotated[Optional[list[EnvVar]], Field(
        description="Environment variables added to the trainer container, after the operator's own (e.g. "
                    "WANDB_API_KEY from a Secret); names unique; at most 64.", max_length=64)] = None
    env_from: Annotated[Optional[list[EnvFromSource]], Field(
        description="Every key of these ConfigMaps or Secrets as environment variables (spec.env and the "
                    "operator's own variables win over them; the operator pins the code-loading ones, "
                    "docs/install.md); at most 16.", max_length=16)] = None
    service_account_name: Annotated[Optional[str], Field(
        description="ServiceAccount the trainer pod runs as (a DNS subdomain, <= 253), for a cloud identity "
                    "(IRSA, workload identity); only names the operator's trainer.jobPodSettings."
                    "serviceAccountNames allow. The pod still gets no Kubernetes API token.",
        pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)] = None
    volumes: Annotated[Optional[list[Volume]], Field(
        description="Extra volumes for spec.volumeMounts: persistentVolumeClaim, configMap, secret or emptyDir "
                    "(exactly one each); names unique; at most 16.", max_length=16)] = None
    volume_mounts: Annotated[Optional[list[VolumeMount]], Field(
        description="Where the trainer container mounts spec.volumes (each names one of them); mount paths "
                    "unique; at most 16.", max_length=16)] = None
    cache: Annotated[Optional[CacheSpec], Field(
        description="The trainer's cache volume (model downloads, compile caches).")] = None
    suspend: Annotated[bool, Field(
        description="Stop the running pod and keep the job; set back to false to resume from the newest "
                    "checkpoint.")] = False
    active_deadline_seconds: Annotated[Optional[int], Field(
        description="Fail the run when it has been active this long (<= 2147483647: larger values overflow "
                    "the Job controller's clock and fail the run at once).", ge=1, le=INT32_MAX)] = None
    backoff_limit: Annotated[int, Field(
        description="Failed attempts (trainer errors, OOM) retried before the job is Failed; interruptions "
                    "(node drain, eviction, preemption, SIGTERM with a checkpoint) do not count, and a "
                    "deterministic failure (bad config, missing source, unwritable output) fails at once.",
        ge=0, le=100)] = 2
    max_interruptions: Annotated[int, Field(
        description="Interruptions (the trainer checkpointed and exited 6, the pod was evicted, preempted, or its "
                    "node drained or lost) the run resumes from before it is Failed (TooManyInterruptions).",
        ge=0, le=10000)] = 100
    termination_grace_period_seconds: Annotated[Optional[int], Field(
        description="Seconds the trainer gets between SIGTERM and SIGKILL to write its interrupt checkpoint. "
                    "Default: the model's checkpoint size over a conservative write bandwidth, with margin "
                    "(600 when the size is unknown).", ge=10, le=7200)] = None
    ttl_seconds_after_finished: Annotated[Optional[int], Field(
        description="Delete the FineTuneJob and its children this long after it finished (<= 2147483647, "
                    "Kubernetes' own Job TTL range).", ge=0, le=INT32_MAX)] = None

    @field_validator("node_selector")
    @classmethod
    def _label_keys(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            problem = qualified_name_problem(key)
            if problem:
                raise ValueError(f"key {key[:80]!r} is not a label key: {problem}")
        return value

    @field_validator("env")
    @classmethod
    def _unique_env(cls, value: Optional[list[EnvVar]]) -> Optional[list[EnvVar]]:
        return _unique(value, "name", "name")

    @field_validator("volumes")
    @classmethod
    def _unique_volumes(cls, value: Optional[list[Volume]]) -> Optional[list[Volume]]:
        return _unique(value, "name", "name")

    @field_validator("volume_mounts")
    @classmethod
    def _mounts_name_volumes(cls, value: Optional[list[VolumeMount]], info: ValidationInfo
                             ) -> Optional[list[VolumeMount]]:
        """Each mount names a volume of spec.volumes (a v1.20 schema cannot refer across fields: the operator
        refuses it, condition InvalidSpec naming the field, before creating anything)."""
        _unique(value, "mount_path", "mountPath")
        names = {volume.name for volume in info.data.get("volumes") or []}
        for index, mount in enumerate(value or []):
            if mount.name not in names:
                raise ValueError(f"[{index}].name: {mount.name!r} is not in spec.volumes")
        return value


class Condition(_Model):
    """One condition in metav1.Condition's shape; observedGeneration: the metadata.generation it was set from."""

    model_config = ConfigDict(extra="allow")
    type: Annotated[str, Field(description="Running, Succeeded, Failed, Suspended, Fits, SpecLocked, "
                                           "UnknownFields... (unique in the list: the list's map key).",
                               min_length=1, max_length=316)]
    status: Annotated[Literal["True", "False", "Unknown"], Field(description="True, False or Unknown.")]
    reason: Annotated[str, Field(description="CamelCase reason for the condition's last transition (e.g. "
                                             "OutOfMemory).", min_length=1, max_length=1024)]
    message: Annotated[str, Field(description="Human-readable detail (may be empty).", max_length=32768)]
    last_transition_time: Annotated[str, Field(description="When status last changed (RFC 3339).",
                                               min_length=1)]
    observed_generation: Annotated[Optional[int], Field(
        description="metadata.generation the condition was set from; older than metadata.generation means "
                    "the condition is out of date.", ge=0)] = None


class Progress(_Model):
    model_config = ConfigDict(extra="allow")
    step: Annotated[Optional[int], Field(description="Optimizer steps done.")] = None
    total_steps: Annotated[Optional[int], Field(description="Optimizer steps planned.")] = None
    display: Annotated[Optional[str], Field(description="step/totalSteps, for kubectl get.")] = None
    epoch: Annotated[Optional[float], Field(description="Fractional epoch.")] = None
    loss: Annotated[Optional[float], Field(description="Latest training loss.")] = None
    tokens_per_second: Annotated[Optional[float], Field(description="Recent training throughput.")] = None
    peak_gpu_memory_bytes: Annotated[Optional[int], Field(
        description="Peak GPU memory: the NVML device peak where available (it includes paged optimizer "
                    "states), else torch's reserved peak.")] = None
    peak_gpu_memory: Annotated[Optional[str], Field(description="Peak GPU memory, human-readable.")] = None
    eta_seconds: Annotated[Optional[float], Field(description="Estimated seconds to completion.")] = None
    eta: Annotated[Optional[str], Field(description="etaSeconds, human-readable (kubectl's duration format: "
                                                    "4m12s, 2h5m), for kubectl get.")] = None
    updated_at: Annotated[Optional[str], Field(description="When progress was last read (RFC 3339).")] = None


class PlannedLayout(_Model):
    model_config = ConfigDict(extra="allow")
    engine: Annotated[Optional[str], Field(description="fused (auto/lean/fast) or unsloth (custom).")] = None
    placement: Annotated[Optional[str], Field(
        description="Where optimizer states live: device, paged (CUDA managed memory), host (pinned, streamed) "
                    "or torch (32-bit on the device).")] = None
    optimizer: Annotated[Optional[str], Field(description="The optimizer that runs.")] = None
    checkpointing: Annotated[Optional[str], Field(description="Activation checkpointing mode.")] = None
    sequences_per_step: Annotated[Optional[int], Field(description="Sequences in each optimizer step.")] = None
    max_seq_length: Annotated[Optional[int], Field(description="Tokens per sequence.")] = None
    uncheckpointed_layers: Annotated[Optional[int], Field(
        description="Decoder layers that keep their activations instead of recomputing them.")] = None
    torch_cap_bytes: Annotated[Optional[int], Field(description="torch's memory cap in the pod.")] = None


class MemoryBreakdown(_Model):
    model_config = ConfigDict(extra="allow")
    weights_bytes: Annotated[Optional[int], Field(description="bf16 weights.")] = None
    optimizer_states_bytes: Annotated[Optional[int], Field(description="Optimizer states, wherever they live.")
                                      ] = None
    activations_bytes: Annotated[Optional[int], Field(
        description="A step's activations and working set (kept layers included).")] = None
    gradients_bytes: Annotated[Optional[int], Field(description="Gradients held at once.")] = None
    stream_buffers_bytes: Annotated[Optional[int], Field(description="Device copies of host-placed states.")
                                    ] = None
    outside_torch_bytes: Annotated[Optional[int], Field(description="CUDA context, kernels, workspaces.")] = None


class PlannedChange(_Model):
    model_config = ConfigDict(extra="allow")
    field: Annotated[Optional[str], Field(description="The spec field.")] = None
    value: Annotated[Optional[str], Field(description="Its value in the spec.")] = None
    planned: Annotated[Optional[str], Field(description="What the run does instead of its literal meaning.")
                       ] = None
    reason: Annotated[Optional[str], Field(description="Why.")] = None


class Estimate(_Model):
    model_config = ConfigDict(extra="allow")
    gpu_memory_bytes: Annotated[Optional[int], Field(
        description="Predicted device peak (NVML: paged states included) of the planned run.")] = None
    gpu_memory: Annotated[Optional[str], Field(description="gpuMemoryBytes, human-readable.")] = None
    torch_reserved_bytes: Annotated[Optional[int], Field(description="Predicted torch reserved peak.")] = None
    host_memory_bytes: Annotated[Optional[int], Field(
        description="Predicted host memory of the trainer (pinned states, offloaded activations).")] = None
    checkpoint_bytes: Annotated[Optional[int], Field(description="Size of one resumable checkpoint.")] = None
    budget_bytes: Annotated[Optional[int], Field(description="The GPU memory budget planned against.")] = None
    budget_source: Annotated[Optional[str], Field(
        description="Where the budget came from (spec.resources.gpuMemoryGiB, spec.resources.gpuProduct).")
    ] = None
    fits: Annotated[Optional[bool], Field(
        description="Whether the plan fits the budget (unset: no budget known before the pod runs).")] = None
    profile: Annotated[Optional[str], Field(description="Profile the run uses.")] = None
    plan: Annotated[Optional[PlannedLayout], Field(description="What the planner chose.")] = None
    breakdown: Annotated[Optional[MemoryBreakdown], Field(description="The device peak, part by part.")] = None
    tokens_per_second: Annotated[Optional[float], Field(
        description="Predicted throughput on the budget's GPU class (the calibration GPU where unknown).")] = None
    eta_seconds: Annotated[Optional[float], Field(
        description="Predicted training time for maxSteps steps of full sequences (unset without maxSteps).")
    ] = None
    dollars: Annotated[Optional[float], Field(description="Predicted GPU cost of etaSeconds.")] = None
    changes: Annotated[Optional[list[PlannedChange]], Field(
        description="Spec fields the run honours differently from their literal meaning, and why.")] = None
    shape: Annotated[Optional[str], Field(description="The model shape used, and where it came from.")] = None
    message: Annotated[Optional[str], Field(description="Why it does not fit, or why it was deferred.")] = None
    calibration: Annotated[Optional[str], Field(description="Version of the planner's calibration.")] = None


class CheckpointStatus(_Model):
    model_config = ConfigDict(extra="allow")
    step: Annotated[Optional[int], Field(description="Step of the newest complete checkpoint.")] = None
    path: Annotated[Optional[str], Field(description="Where it is (under spec.output.destination).")] = None
    time: Annotated[Optional[str], Field(description="When it was marked complete (RFC 3339).")] = None
    bytes: Annotated[Optional[int], Field(description="Its size on disk.")] = None
    interrupt_checkpoint: Annotated[Optional[Literal["Written", "Skipped"]], Field(
        description="The last interruption's checkpoint: Written, or Skipped (it could not finish before the "
                    "grace period ended; the run resumes from `step`, the steps after it are trained again).")
    ] = None
    lost_steps: Annotated[Optional[int], Field(
        description="Steps trained after `step` that the last interruption lost (interruptCheckpoint Skipped).")
    ] = None
    message: Annotated[Optional[str], Field(description="What the trainer said about the last interruption.")
                       ] = None


class OutputStatus(_Model):
    model_config = ConfigDict(extra="allow")
    path: Annotated[Optional[str], Field(description="Where the final model was written.")] = None
    files: Annotated[Optional[int], Field(description="Files written.")] = None
    bytes: Annotated[Optional[int], Field(description="Bytes written.")] = None
    verified: Annotated[Optional[bool], Field(
        description="Read back after writing: every tensor equal to the trained one (on CPU also the logits).")
    ] = None


class CostStatus(_Model):
    model_config = ConfigDict(extra="allow")
    gpu_hourly_price: Annotated[Optional[float], Field(description="$/hour of the GPU, from the price table.")
                                ] = None
    dollars: Annotated[Optional[float], Field(description="GPU cost so far.")] = None
    tokens_per_dollar: Annotated[Optional[float], Field(description="Trained tokens per dollar.")] = None


class PodAttempt(_Model):
    model_config = ConfigDict(extra="allow")
    name: Annotated[Optional[str], Field(description="The trainer pod.")] = None
    uid: Annotated[Optional[str], Field(description="Its metadata.uid.")] = None
    created: Annotated[Optional[str], Field(description="Its metadata.creationTimestamp.")] = None
    ran: Annotated[Optional[bool], Field(description="Its trainer was seen running.")] = None
    ended: Annotated[Optional[Literal["Interruption", "Failure", "NotCounted"]], Field(
        description="How its attempt was counted, decided once its ending was final (the pod terminal, or "
                    "stopped and being deleted, or gone); unset while it runs. NotCounted: it succeeded, never "
                    "ran, or was stopped by the operator's own action (suspend, the run failed or finished, the "
                    "Job stopped or past its deadline).")] = None
    reason: Annotated[Optional[str], Field(
        description="The attempt's reason (Interrupted, Evicted, Preempted, PodDeleted, OutOfMemory, ...; "
                    "Stopped, Succeeded, NeverRan when NotCounted).")] = None


class AttemptRecord(_Model):
    model_config = ConfigDict(extra="allow")
    job_uid: Annotated[Optional[str], Field(
        description="The Job whose pods these are (earlier Jobs' attempts are in its kubesloth.io/prior-* "
                    "annotations).")] = None
    before: Annotated[Optional[str], Field(
        description="The Job's pods created before this time (RFC 3339) are counted in earlierInterruptions "
                    "and earlierFailures and no longer listed.")] = None
    earlier_interruptions: Annotated[Optional[int], Field(
        description="Interruptions of the Job's pods created before `before`.", ge=0)] = None
    earlier_failures: Annotated[Optional[int], Field(
        description="Failures of the Job's pods created before `before`.", ge=0)] = None
    pods: Annotated[Optional[list[PodAttempt]], Field(
        description="The Job's pods from `before` on, each with how its attempt was counted.")] = None
    last_reason: Annotated[Optional[str], Field(
        description="The reason of the newest counted attempt (kept when its entry is folded into the earlier "
                    "counts): what the Running message names once that pod is gone.", max_length=128)] = None


class FineTuneJobStatus(_Model):
    model_config = ConfigDict(extra="allow")
    phase: Annotated[Optional[Phase], Field(description="Pending, Queued, Running, Succeeded, Failed or "
                                                        "Suspended.")] = None
    message: Annotated[Optional[str], Field(description="Why the job is in its phase.")] = None
    conditions: Annotated[list[Condition], Field(description="Latest observations of the job's state.",
                                                 default_factory=list)]
    job_name: Annotated[Optional[str], Field(description="The batch/v1 Job running the trainer.")] = None
    pod_name: Annotated[Optional[str], Field(description="The current trainer pod.")] = None
    start_time: Annotated[Optional[str], Field(description="When the trainer first started.")] = None
    completion_time: Annotated[Optional[str], Field(description="When the job finished.")] = None
    restarts: Annotated[Optional[int], Field(description="Trainer pod restarts and retries.")] = None
    interruptions: Annotated[Optional[int], Field(
        description="Attempts that ended by an interruption (exit 6 after a checkpoint, eviction, preemption, "
                    "node drain or loss, SIGKILL after the grace period); they count against "
                    "spec.maxInterruptions, not spec.backoffLimit.")] = None
    failures: Annotated[Optional[int], Field(
        description="Attempts that failed (trainer error, OOM); they count against spec.backoffLimit.")] = None
    observed_generation: Annotated[Optional[int], Field(description="metadata.generation last acted on.")] = None
    progress: Annotated[Optional[Progress], Field(description="Live training progress.")] = None
    estimate: Annotated[Optional[Estimate], Field(description="GPU memory estimate.")] = None
    checkpoint: Annotated[Optional[CheckpointStatus], Field(description="Newest complete checkpoint.")] = None
    output: Annotated[Optional[OutputStatus], Field(description="The saved model.")] = None
    cost: Annotated[Optional[CostStatus], Field(description="GPU cost of the run.")] = None
    attempts: Annotated[Optional[AttemptRecord], Field(
        description="The operator's record of the current Job's trainer pods: each attempt counted once, when "
                    "its ending is final, so interruptions and failures stand when their pods are gone (deleted "
                    "by hand, garbage-collected).")] = None


class FineTuneJob(_Model):
    """A full fine-tuning run of one model on one GPU."""

    model_config = ConfigDict(extra="ignore")
    api_version: Annotated[Literal["kubesloth.io/v1alpha1"], Field(alias="apiVersion")] = API_VERSION
    kind: Literal["FineTuneJob"] = KIND
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: FineTuneJobSpec
    status: Optional[FineTuneJobStatus] = None


PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Progress", "type": "string", "jsonPath": ".status.progress.display"},
    {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss", "priority": 1},
    {"name": "Tokens/s", "type": "number", "jsonPath": ".status.progress.tokensPerSecond"},
    {"name": "ETA", "type": "string", "jsonPath": ".status.progress.eta"},
    {"name": "Peak GPU Mem", "type": "string", "jsonPath": ".status.progress.peakGpuMemory"},
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.source", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]
