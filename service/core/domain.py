"""The single definition of tuneserve's domain types. API schemas and workers wrap these."""
from __future__ import annotations

import enum
import re
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from service.core.errors import InvalidInput, unknown_key_message

# Named sentinel for "no adapter, the base model" (never None).
BASE_ADAPTER = "__base__"

# Adapter / tenant / suffix names: lowercase, digits, '-', '_', '.', no leading dot, bounded.
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
TENANT_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def check_name(value: str, *, param: str, pattern: re.Pattern[str] = NAME_PATTERN) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value) or ".." in value:
        raise InvalidInput(f"{param} must match {pattern.pattern} (got {value!r})", param=param)
    return value


# ---------------------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------------------
class JobStatus(str, enum.Enum):
    validating_files = "validating_files"
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})

# Legal transitions. running -> queued is a redelivery after a dead worker (resume from checkpoint).
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.validating_files: frozenset({JobStatus.queued, JobStatus.failed, JobStatus.cancelled}),
    JobStatus.queued: frozenset({JobStatus.running, JobStatus.failed, JobStatus.cancelled}),
    JobStatus.running: frozenset({JobStatus.queued, JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled}),
    JobStatus.succeeded: frozenset(),
    JobStatus.failed: frozenset(),
    JobStatus.cancelled: frozenset(),
}


def can_transition(old: JobStatus, new: JobStatus) -> bool:
    return new in TRANSITIONS[old]


class JobErrorCode(str, enum.Enum):
    out_of_memory = "out_of_memory"
    invalid_data = "invalid_data"
    model_not_found = "model_not_found"
    invalid_plan = "invalid_plan"
    worker_lost = "worker_lost"
    internal = "internal"


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


# What a running job is doing: optimizer steps, then evaluation (validation loss, then greedy
# replies of the base and of the adapter on the evaluation prompts), then publishing the adapter.
JobPhase = Literal["training", "evaluating", "publishing"]


class JobProgress(BaseModel):
    step: int = 0
    total_steps: int | None = None
    epoch: float | None = None
    loss: float | None = None
    # Share of label tokens whose argmax prediction is the label (TRL's `mean_token_accuracy`):
    # of the last logged step, and of the last validation pass.
    mean_token_accuracy: float | None = None
    eval_loss: float | None = None
    eval_mean_token_accuracy: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    label_tokens_per_second: float | None = None
    # Seconds until the job ends: the rest of training, plus the validation-loss passes (timed
    # when one ran, else bounded by training's own seconds per token), plus the before/after
    # generation (estimated from a timed probe before training, then measured while it runs).
    eta_seconds: float | None = None
    phase: JobPhase | None = None
    # While evaluating: replies generated so far of eval_total (base and adapter, one per prompt each).
    eval_done: int | None = None
    eval_total: int | None = None

    @property
    def phase_text(self) -> str | None:
        """`training`, `evaluating 12/100`, `publishing` (None before the first report)."""
        if self.phase == "evaluating" and self.eval_total:
            return f"evaluating {self.eval_done or 0}/{self.eval_total}"
        return self.phase


# ---------------------------------------------------------------------------------------
# Training spec (hyperparameters + LoRA/QLoRA + data mapping). Validated once, here.
# ---------------------------------------------------------------------------------------
TrainFormat = Literal["chat", "plain"]
Scheduler = Literal["linear", "cosine", "constant"]
Auto = Literal["auto"]

# Base learning rate that OpenAI's learning_rate_multiplier scales (the lecture's QLoRA LR).
BASE_LEARNING_RATE = 1e-4


class DatasetSource(BaseModel):
    """A dataset the `datasets` library loads: hub name, local dataset dir, or parquet/json files."""
    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, max_length=1024)
    name: str | None = Field(default=None, max_length=256)  # dataset config name
    split: str = Field(default="train", pattern=r"^[A-Za-z0-9_\-\[\]:%.+]{1,64}$")
    content_column: str = Field(default="content", max_length=128)
    summary_column: str = Field(default="summary", max_length=128)
    max_rows: int | None = Field(default=None, ge=1, le=10_000_000)


MODULE_NAME = r"[A-Za-z_][A-Za-z0-9_.]{0,127}"  # a LoRA target module's name
MAX_TARGET_MODULES = 64


class TrainingSpec(BaseModel):
    """Everything a training run needs besides data and base model. Units are explicit."""
    model_config = ConfigDict(extra="forbid")

    # Length of training: epochs or an explicit step budget (max_steps wins when set).
    n_epochs: float = Field(default=3.0, gt=0, le=100)
    max_steps: int | None = Field(default=None, ge=1, le=1_000_000)
    batch_size: int = Field(default=16, ge=1, le=4096)  # effective batch (micro x accumulation)
    micro_batch_size: int | None = Field(default=None, ge=1, le=1024)  # None = planner decides
    gradient_accumulation_steps: int | None = Field(default=None, ge=1, le=4096)
    learning_rate: float = Field(default=BASE_LEARNING_RATE, gt=0, le=1.0)
    lr_scheduler: Scheduler = "linear"
    warmup_ratio: float = Field(default=0.0, ge=0, le=1)
    weight_decay: float = Field(default=0.0, ge=0, le=1)
    max_grad_norm: float = Field(default=1.0, gt=0, le=1e4)

    lora_r: int = Field(default=8, ge=1, le=512)
    lora_alpha: float = Field(default=32.0, gt=0, le=4096)
    lora_dropout: float = Field(default=0.05, ge=0, lt=1)
    # None = family default. The rule is the validator's below; the schema states it too.
    lora_target_modules: list[str] | None = Field(default=None, json_schema_extra=lambda s: s["anyOf"][0].update(
        minItems=1, maxItems=MAX_TARGET_MODULES, items={"type": "string", "pattern": f"^{MODULE_NAME}$"}))

    load_in_4bit: bool = True  # QLoRA: NF4 + double quant
    gradient_checkpointing: bool | Auto = "auto"
    packing: bool = True

    max_source_length: int = Field(default=128, ge=1, le=32768)
    max_target_length: int = Field(default=256, ge=1, le=32768)
    train_format: TrainFormat = "chat"

    seed: int = Field(default=42, ge=0, le=2**32 - 1)
    logging_steps: int = Field(default=1, ge=1, le=100_000)
    checkpoint_steps: int = Field(default=50, ge=1, le=1_000_000)
    eval_steps: int | None = Field(default=None, ge=1, le=1_000_000)
    eval_max_samples: int = Field(default=50, ge=0, le=100_000)
    eval_max_new_tokens: int = Field(default=128, ge=1, le=4096)
    n_gpus: int = Field(default=1, ge=1, le=64)

    @field_validator("lora_target_modules")
    @classmethod
    def _targets(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value or len(value) > MAX_TARGET_MODULES:
            raise ValueError(f"must list 1..{MAX_TARGET_MODULES} module names")
        for name in value:
            if not re.fullmatch(MODULE_NAME, name):
                raise ValueError(f"invalid module name {name!r}")
        return value

    @model_validator(mode="after")
    def _cross_field(self) -> "TrainingSpec":
        if self.micro_batch_size and self.micro_batch_size > self.batch_size:
            raise ValueError("micro_batch_size cannot exceed batch_size")
        if self.max_source_length + self.max_target_length > 65536:
            raise ValueError("max_source_length + max_target_length must be <= 65536")
        return self

    @classmethod
    def from_hyperparameters(cls, hyperparameters: dict[str, Any] | None,
                             seed: int | None = None, param_prefix: str = "hyperparameters") -> "TrainingSpec":
        """Accept OpenAI's keys (n_epochs, batch_size, learning_rate_multiplier; number or "auto")
        beside ours. Raises InvalidInput listing every problem at once."""
        raw = dict(hyperparameters or {})
        if not isinstance(hyperparameters, (dict, type(None))):
            raise InvalidInput("hyperparameters must be an object", param=param_prefix)
        problems: list[dict[str, Any]] = []
        for key in ("n_epochs", "batch_size", "learning_rate_multiplier"):
            if raw.get(key) == "auto":
                raw.pop(key)
        multiplier = raw.pop("learning_rate_multiplier", None)
        if multiplier is not None:
            if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)) or not 0 < multiplier <= 1000:
                problems.append({"param": f"{param_prefix}.learning_rate_multiplier",
                                 "message": "must be a number in (0, 1000] or \"auto\""})
            elif "learning_rate" in raw:
                problems.append({"param": f"{param_prefix}.learning_rate_multiplier",
                                 "message": "give learning_rate or learning_rate_multiplier, not both"})
            else:
                raw["learning_rate"] = BASE_LEARNING_RATE * float(multiplier)
        if seed is not None:
            raw["seed"] = seed
        try:
            spec = cls.model_validate(raw)
        except ValidationError as exc:
            for err in exc.errors():
                loc = ".".join(str(p) for p in err["loc"])
                message = err["msg"]
                if err["type"] == "extra_forbidden":
                    message = unknown_key_message(str(err["loc"][-1]), HYPERPARAMETER_KEYS)
                problems.append({"param": f"{param_prefix}.{loc}" if loc else param_prefix, "message": message})
            spec = None
        if problems:
            raise InvalidInput.from_problems(problems)
        assert spec is not None
        return spec


# Every key `hyperparameters` may hold: TrainingSpec's fields and OpenAI's multiplier.
HYPERPARAMETER_KEYS = frozenset(TrainingSpec.model_fields) | {"learning_rate_multiplier"}


# ---------------------------------------------------------------------------------------
# Files (datasets uploaded for training)
# ---------------------------------------------------------------------------------------
class DatasetFormat(str, enum.Enum):
    advertisegen = "advertisegen"  # {"content", "summary"}
    chatglm3 = "chatglm3"          # {"conversations": [{"role", "content"}]}
    openai = "openai"              # {"messages": [{"role", "content"}]}


CHAT_ROLES = frozenset({"system", "user", "assistant", "observation"})


# ---------------------------------------------------------------------------------------
# Adapters
# ---------------------------------------------------------------------------------------
class AdapterDraft(BaseModel):
    """What a training run decides about the adapter it made: the manifest less what the
    registry adds when it publishes (tenant, name, version, files, created_at) and less the
    run's record (a TrainingReport)."""
    base_model: str  # the base's public id (service.core.identity), never a host path
    base_model_fingerprint: str | None = None  # e.g. hash of config.json, to refuse mismatches
    model_family: str | None = None
    target_modules: list[str]
    r: int
    lora_alpha: float
    job_id: str | None = None

    def manifest_fields(self, report: "TrainingReport") -> dict[str, Any]:
        """What AdapterRegistry.publish(manifest=...) takes: this draft plus the report."""
        return {**self.model_dump(mode="json"), "training": report.manifest_training(), "metrics": report.metrics}


class TrainingReport(BaseModel):
    """One training run's record. The manifest's `training`/`metrics` and the job's `result`
    are views of it (manifest_training, job_result), never separately kept copies."""
    spec: TrainingSpec
    steps: int
    total_steps: int
    trained_tokens: int            # real tokens the model saw (padding excluded), all ranks
    label_tokens: int
    resumed_from_step: int | None = None
    data: dict[str, Any] = Field(default_factory=dict)         # rows/tokens/length statistics
    data_fingerprint: str | None = None
    memory_plan: dict[str, Any] = Field(default_factory=dict)
    throughput: dict[str, Any] = Field(default_factory=dict)   # train seconds, tok/s, peak memory, device
    loss_history: list[list[int | float]] = Field(default_factory=list)  # [step, loss], downsampled
    eval_history: list[list[int | float]] = Field(default_factory=list)  # [step, eval_loss]
    wall_seconds: float | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)      # train/eval loss, BLEU/ROUGE before/after

    def training(self) -> dict[str, Any]:
        """The run's record without the spec (the job shows its spec as hyperparameters)."""
        return self.model_dump(mode="json", exclude={"spec", "metrics"})

    def manifest_training(self) -> dict[str, Any]:
        return {"spec": self.spec.model_dump(mode="json"), **self.training()}

    def job_result(self) -> dict[str, Any]:
        return {"training": self.training(), "metrics": self.metrics}


class AdapterManifest(AdapterDraft):
    """manifest.json beside adapter_config.json + adapter_model.safetensors."""
    tenant: str
    name: str
    version: int
    created_at: datetime
    files: dict[str, str] = Field(default_factory=dict)  # filename -> sha256
    training: dict[str, Any] = Field(default_factory=dict)  # spec, data, steps
    metrics: dict[str, Any] = Field(default_factory=dict)   # BLEU/ROUGE, before/after table

    @property
    def model_id(self) -> str:
        """The name clients pass as `model` (a job's fine_tuned_model)."""
        return self.name


# The before/after table (prompt, reference, base reply, adapter reply per evaluation prompt)
# lives at metrics["quality"][SAMPLES_KEY]: 40-50 rows, tens of KB. Lists and job views carry
# the summary; the rows have their own routes (/samples).
SAMPLES_KEY = "before_after"


def metrics_summary(metrics: dict[str, Any] | None) -> dict[str, Any]:
    """`metrics` without the before/after rows (scores, n_samples and the rest kept)."""
    out = dict(metrics or {})
    quality = out.get("quality")
    if isinstance(quality, dict) and SAMPLES_KEY in quality:
        out["quality"] = {k: v for k, v in quality.items() if k != SAMPLES_KEY}
    return out


def metrics_samples(metrics: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The before/after rows of `metrics` ([] when there was no evaluation)."""
    quality = (metrics or {}).get("quality")
    rows = quality.get(SAMPLES_KEY) if isinstance(quality, dict) else None
    return list(rows) if isinstance(rows, list) else []


def result_summary(result: dict[str, Any] | None) -> dict[str, Any]:
    """A job's result with its metrics summarised (metrics_summary)."""
    out = dict(result or {})
    if isinstance(out.get("metrics"), dict):
        out["metrics"] = metrics_summary(out["metrics"])
    return out


# A suffix ends up inside `ft-<suffix>-<12-char job tail>`, which must stay a NAME_PATTERN name
# (63 characters at most) whatever the tail: 63 - len("ft-") - len("-") - 12 = 47; 45 leaves
# room and is the documented limit.
SUFFIX_MAX_CHARS = 45
SUFFIX_RULE = f"lowercase letters, digits, '-', '_' or '.', start alphanumeric, at most {SUFFIX_MAX_CHARS} characters"


# A job's metadata (OpenAI's limits).
MAX_METADATA_KEYS = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512

# SUFFIX_RULE as a JSON-schema pattern (with SUFFIX_MAX_CHARS as maxLength), for the spec.
SUFFIX_PATTERN = r"^(?!.*\.\.)[a-z0-9][a-z0-9_.-]*$"


def suffix_problem(suffix: str) -> str | None:
    """Why `suffix` cannot name an adapter (SUFFIX_RULE), or None."""
    if len(suffix) > SUFFIX_MAX_CHARS or not NAME_PATTERN.fullmatch(suffix) or ".." in suffix:
        return f"suffix must be {SUFFIX_RULE}"
    return None


def adapter_name_for_job(job_id: str, suffix: str | None) -> str:
    """The fine_tuned_model name a job publishes: `ft-<suffix>-<job id tail>`."""
    tail = job_id.split("-", 1)[-1][:12].lower()
    return f"ft-{suffix}-{tail}" if suffix else f"ft-{tail}"


# ---------------------------------------------------------------------------------------
# Records the store returns (detached from the ORM). API schemas wrap these.
# ---------------------------------------------------------------------------------------
class FileInfo(BaseModel):
    id: str  # "file-…"
    tenant: str
    filename: str
    purpose: str
    bytes: int
    rows: int
    format: DatasetFormat | None = None  # None: not a dataset (a job's results CSV)
    sha256: str
    path: str  # server-side location; never exposed by the API
    created_at: datetime


class Job(BaseModel):
    id: str  # "ftjob-…"
    tenant: str
    model: str
    status: JobStatus
    spec: TrainingSpec
    training_file: str | None = None
    validation_file: str | None = None
    training_dataset: DatasetSource | None = None
    validation_dataset: DatasetSource | None = None
    suffix: str | None = None
    metadata: dict[str, str] | None = None
    fine_tuned_model: str | None = None
    trained_tokens: int | None = None
    error: JobError | None = None
    progress: JobProgress = Field(default_factory=JobProgress)
    cancel_requested: bool = False
    worker_id: str | None = None
    attempts: int = 0
    heartbeat_at: datetime | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    result: dict[str, Any] = Field(default_factory=dict)  # eval metrics, memory plan, before/after


class JobEvent(BaseModel):
    id: str  # "ftevent-…"
    job_id: str
    created_at: datetime
    level: Literal["info", "warn", "error"] = "info"
    type: Literal["message", "metrics"] = "message"
    message: str
    data: dict[str, Any] | None = None


class ApiKeyInfo(BaseModel):
    id: str
    tenant: str
    name: str | None = None
    prefix: str  # first characters of the key, for display
    created_at: datetime
    revoked_at: datetime | None = None


# ---------------------------------------------------------------------------------------
# Webhooks (OpenAI's /v1/webhook_endpoints; deliveries signed per Standard Webhooks)
# ---------------------------------------------------------------------------------------
class WebhookEventType(str, enum.Enum):
    """The event types this service sends (OpenAI's names)."""
    fine_tuning_job_succeeded = "fine_tuning.job.succeeded"
    fine_tuning_job_failed = "fine_tuning.job.failed"
    fine_tuning_job_cancelled = "fine_tuning.job.cancelled"


# The job transitions that emit an event: exactly the final states.
JOB_WEBHOOK_EVENTS: dict[JobStatus, WebhookEventType] = {
    JobStatus.succeeded: WebhookEventType.fine_tuning_job_succeeded,
    JobStatus.failed: WebhookEventType.fine_tuning_job_failed,
    JobStatus.cancelled: WebhookEventType.fine_tuning_job_cancelled,
}


class WebhookEndpoint(BaseModel):
    id: str  # "whep-…"
    tenant: str
    name: str
    url: str
    event_types: list[WebhookEventType]
    secret: str  # "whsec_<base64>"; kept to sign (unlike API keys it cannot be hashed)
    # After a rotation with keep_old_secret_active_for_24_hours: deliveries carry both signatures.
    previous_secret: str | None = None
    previous_secret_expires_at: datetime | None = None
    created_at: datetime
    updated_at: datetime

    def signing_secrets(self, now: datetime) -> list[str]:
        """The secrets a delivery sent at `now` is signed with, newest first."""
        out = [self.secret]
        if self.previous_secret and self.previous_secret_expires_at and now < self.previous_secret_expires_at:
            out.append(self.previous_secret)
        return out


class DeliveryStatus(str, enum.Enum):
    pending = "pending"      # due at next_attempt_at (also while one sender holds it)
    succeeded = "succeeded"  # the endpoint answered 2xx
    failed = "failed"        # gave up after webhook_max_attempts


class WebhookDelivery(BaseModel):
    """One event for one endpoint. Its id is the `webhook-id` header: the same on every retry."""
    id: str  # "msg_…"
    endpoint_id: str
    tenant: str
    event_id: str  # "evt_…", the body's id
    event_type: WebhookEventType
    payload: str  # the exact body sent (and signed), fixed when the event happened
    status: DeliveryStatus = DeliveryStatus.pending
    attempts: int = 0
    next_attempt_at: datetime | None = None
    last_attempt_at: datetime | None = None
    last_status_code: int | None = None
    last_error: str | None = None
    created_at: datetime
    delivered_at: datetime | None = None
    test: bool = False  # sent once by POST .../test, never retried


# ---------------------------------------------------------------------------------------
# Generation (what the engine is asked and answers)
# ---------------------------------------------------------------------------------------
class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "observation"]
    content: str = Field(max_length=1_000_000)


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(default=256, ge=1, le=32768)
    temperature: float = Field(default=0.8, ge=0, le=2)  # 0 = greedy
    top_p: float = Field(default=0.8, gt=0, le=1)
    top_k: int = Field(default=0, ge=0, le=100_000)  # 0 = off
    repetition_penalty: float = Field(default=1.0, gt=0, le=10)
    stop: list[str] = Field(default_factory=list, max_length=16)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)


class GenerationRequest(BaseModel):
    tenant: str
    adapter: str = BASE_ADAPTER  # adapter name in the tenant's registry, or BASE_ADAPTER
    # The version the caller already looked up (so a request reads the registry once); None:
    # the engine looks up the latest itself.
    adapter_version: int | None = None
    messages: list[ChatMessage]
    params: SamplingParams = Field(default_factory=SamplingParams)
    request_id: str | None = None
    timeout_s: float | None = None
    # Set when the client chose max_tokens: the name of its field in that request. Then a value
    # that cannot fit the context is refused naming it (as OpenAI does); otherwise (the default,
    # internal callers) generation is clipped to the context.
    max_tokens_field: str | None = None


class GenerationResult(BaseModel):
    text: str
    finish_reason: Literal["stop", "length", "cancelled", "timeout"]
    prompt_tokens: int
    completion_tokens: int
    adapter: str
    adapter_version: int | None = None
