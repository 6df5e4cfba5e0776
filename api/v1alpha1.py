"""FineTuneJob v1alpha1: the single source of the CRD schema, the operator's view and the trainer's config.

Attribute names are snake_case in Python and camelCase on the wire (the contract in docs/api.md). Every field
carries a description: it becomes the CRD's documentation (`kubectl explain ftj.spec...`).
Only stdlib and pydantic may be imported here (tests/test_layers.py enforces it).
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

GROUP = "kubesloth.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ["ftj"]
CATEGORIES = ["kubesloth", "ml"]

# RE2-compatible (the API server validates `pattern` with Go's regexp): no look-arounds.
SOURCE_PATTERN = (
    r"^(hf://[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9._-]+)?(@[A-Za-z0-9._/-]+)?"
    r"|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/[^\s]*)?"
    r"|s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\s]*)?"
    r"|file:///[^\s]*)$"
)
DESTINATION_PATTERN = (
    r"^(pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/[^\s]*)?"
    r"|s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\s]*)?"
    r"|file:///[^\s]*)$"
)
QUANTITY_PATTERN = r"^([0-9]+(\.[0-9]+)?|\.[0-9]+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


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
    key: Annotated[str, Field(description="Key in the Secret that holds the token.", min_length=1)] = "token"


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


class DatasetSpec(_Model):
    source: Annotated[str, Field(
        description="Where the data is: hf://ORG/NAME, pvc://CLAIM/path, s3://bucket/prefix or file:///path "
                    "(a .jsonl, .json or .parquet file, or a directory of them).",
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
        description="Use only the first N records (smoke tests, demos).", ge=1)] = None


class TrainingSpec(_Model):
    profile: Annotated[Profile, Field(
        description="auto: pick what fits the GPU's memory; lean: least memory (8-bit paged optimizer, "
                    "offloaded checkpointing); fast: highest throughput that fits; custom: the fields below "
                    "exactly as given.")] = Profile.auto
    epochs: Annotated[int, Field(description="Passes over the dataset (ignored when maxSteps is set).",
                                 ge=1, le=1000)] = 1
    max_steps: Annotated[Optional[int], Field(
        description="Stop after this many optimizer steps; overrides epochs.", ge=1)] = None
    learning_rate: Annotated[float, Field(description="Peak learning rate; must be > 0 and < 1.",
                                          gt=0, lt=1)] = 2.0e-5
    per_device_batch_size: Annotated[int, Field(description="Sequences per forward pass.", ge=1, le=1024)] = 1
    gradient_accumulation_steps: Annotated[int, Field(
        description="Forward/backward passes per optimizer step.", ge=1, le=1024)] = 4
    optimizer: Annotated[Optimizer, Field(
        description="Optimizer; 8-bit and paged variants need a GPU (the CPU engine maps them to adamw_torch).")
    ] = Optimizer.paged_adamw_8bit
    gradient_checkpointing: Annotated[GradientCheckpointing, Field(
        description='Activation checkpointing: "unsloth" (offloaded to host memory), "true" or "false". '
                    "A string, not a YAML boolean.")] = GradientCheckpointing.unsloth
    lr_scheduler: Annotated[LRScheduler, Field(description="Learning-rate schedule.")] = LRScheduler.linear
    warmup_ratio: Annotated[float, Field(description="Fraction of steps spent warming up, 0 to 1.",
                                         ge=0, le=1)] = 0.03
    weight_decay: Annotated[float, Field(description="AdamW weight decay, >= 0.", ge=0)] = 0.0
    max_grad_norm: Annotated[float, Field(description="Gradient clipping norm; 0 turns clipping off.",
                                          ge=0)] = 1.0
    seed: Annotated[int, Field(description="Random seed for data order and initialisation.", ge=0)] = 3407
    logging_steps: Annotated[int, Field(description="Log and publish progress every N steps.", ge=1)] = 1


class OutputSpec(_Model):
    destination: Annotated[str, Field(
        description="Where checkpoints and the final model go: pvc://CLAIM/path, s3://bucket/prefix or "
                    "file:///path.", pattern=DESTINATION_PATTERN)]
    checkpoint_every_steps: Annotated[int, Field(
        description="Write a resumable checkpoint every N optimizer steps.", ge=1)] = 200
    checkpoints_to_keep: Annotated[int, Field(description="Newest checkpoints kept; older ones are deleted.",
                                              ge=1, le=100)] = 2


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


class Toleration(_Model):
    key: Annotated[Optional[str], Field(description="Taint key the toleration applies to.")] = None
    operator: Annotated[Optional[Literal["Exists", "Equal"]], Field(description="Exists or Equal.")] = None
    value: Annotated[Optional[str], Field(description="Taint value, for operator Equal.")] = None
    effect: Annotated[Optional[Literal["NoSchedule", "PreferNoSchedule", "NoExecute"]], Field(
        description="Taint effect to match; empty matches all.")] = None
    toleration_seconds: Annotated[Optional[int], Field(
        description="For NoExecute: how long the pod stays bound after the taint appears.")] = None


class FineTuneJobSpec(_Model):
    model: Annotated[ModelSpec, Field(description="The base model to fine-tune (every weight is trained).")]
    dataset: Annotated[DatasetSpec, Field(description="The training data.")]
    training: Annotated[TrainingSpec, Field(description="Hyperparameters and the profile.",
                                            default_factory=TrainingSpec)]
    output: Annotated[OutputSpec, Field(description="Where checkpoints and the trained model are written.")]
    resources: Annotated[ResourcesSpec, Field(description="What the single-GPU pod asks for.",
                                              default_factory=ResourcesSpec)]
    node_selector: Annotated[dict[str, str], Field(description="Extra node labels the pod must match.",
                                                   default_factory=dict)]
    tolerations: Annotated[list[Toleration], Field(description="Tolerations added to the pod (e.g. GPU taints).",
                                                   default_factory=list)]
    priority_class_name: Annotated[Optional[str], Field(description="PriorityClass of the pod.",
                                                        pattern=DNS_SUBDOMAIN_PATTERN)] = None
    queue_name: Annotated[Optional[str], Field(
        description="Kueue LocalQueue: the Job gets label kueue.x-k8s.io/queue-name and is created suspended "
                    "for Kueue to admit.", pattern=DNS_SUBDOMAIN_PATTERN)] = None
    image: Annotated[Optional[str], Field(description="Trainer image; overrides the operator's default.",
                                          min_length=1)] = None
    suspend: Annotated[bool, Field(
        description="Stop the running pod and keep the job; set back to false to resume from the newest "
                    "checkpoint.")] = False
    active_deadline_seconds: Annotated[Optional[int], Field(
        description="Fail the run when it has been active this long.", ge=1)] = None
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
        description="Delete the FineTuneJob and its children this long after it finished.", ge=0)] = None


class Condition(_Model):
    model_config = ConfigDict(extra="allow")
    type: Annotated[str, Field(description="Ready, Running, Succeeded, Failed, Suspended, Fits, SpecLocked…")]
    status: Annotated[Literal["True", "False", "Unknown"], Field(description="True, False or Unknown.")]
    reason: Annotated[Optional[str], Field(description="CamelCase reason (e.g. OutOfMemory).")] = None
    message: Annotated[Optional[str], Field(description="Human-readable detail.")] = None
    last_transition_time: Annotated[Optional[str], Field(description="When status last changed (RFC 3339).")] = None


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
    updated_at: Annotated[Optional[str], Field(description="When progress was last read (RFC 3339).")] = None


class Estimate(_Model):
    model_config = ConfigDict(extra="allow")
    gpu_memory_bytes: Annotated[Optional[int], Field(description="Estimated device memory of the run.")] = None
    fits: Annotated[Optional[bool], Field(description="Whether the estimate fits resources.gpuMemoryGiB.")] = None
    profile: Annotated[Optional[str], Field(description="Profile the run uses (auto resolved).")] = None


class CheckpointStatus(_Model):
    model_config = ConfigDict(extra="allow")
    step: Annotated[Optional[int], Field(description="Step of the newest complete checkpoint.")] = None
    path: Annotated[Optional[str], Field(description="Where it is.")] = None


class OutputStatus(_Model):
    model_config = ConfigDict(extra="allow")
    path: Annotated[Optional[str], Field(description="Where the final model was written.")] = None
    files: Annotated[Optional[int], Field(description="Files written.")] = None
    bytes: Annotated[Optional[int], Field(description="Bytes written.")] = None


class CostStatus(_Model):
    model_config = ConfigDict(extra="allow")
    gpu_hourly_price: Annotated[Optional[float], Field(description="$/hour of the GPU, from the price table.")
                                ] = None
    dollars: Annotated[Optional[float], Field(description="GPU cost so far.")] = None
    tokens_per_dollar: Annotated[Optional[float], Field(description="Trained tokens per dollar.")] = None


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
    {"name": "Peak GPU Mem", "type": "string", "jsonPath": ".status.progress.peakGpuMemory"},
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.source", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]
