"""Wire models. They WRAP the domain types (service.core.domain); nothing is defined twice.

Families: *Create (what a client sends), *Public (what a client sees, built from a domain
record by `from_domain`, so internal fields such as tenant, server paths or worker ids can
never leak by accident)."""
from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, create_model, model_serializer

from service.core.domain import (
    BASE_LEARNING_RATE,
    MAX_METADATA_KEY_CHARS,
    MAX_METADATA_KEYS,
    MAX_METADATA_VALUE_CHARS,
    SUFFIX_MAX_CHARS,
    SUFFIX_PATTERN,
    ApiKeyInfo,
    AdapterManifest,
    DatasetFormat,
    DatasetSource,
    DeliveryStatus,
    FileInfo,
    GenerationResult,
    Job,
    JobError,
    JobEvent,
    JobProgress,
    TrainingSpec,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookEventType,
    metrics_samples,
    metrics_summary,
    result_summary,
)
from service.core.webhooks import MAX_URL_LENGTH, secret_hint

# The organisation every object reports (tenants are internal and never echoed back).
ORGANIZATION_ID = "org-tuneserve"


def unix(ts: datetime | None) -> int | None:
    if ts is None:
        return None
    if ts.tzinfo is None:  # the store keeps UTC; SQLite may hand it back naive
        ts = ts.replace(tzinfo=timezone.utc)
    return int(ts.timestamp())


def _num(value: float) -> int | float:
    # OpenAI reports n_epochs / batch_size as ints; keep fractions when they are real.
    return int(value) if float(value).is_integer() else float(value)


def _non_null(extra: dict[str, Any]):
    """json_schema_extra for an optional field: `extra` applies to its non-null branch."""
    return lambda s: (s["anyOf"][0] if "anyOf" in s else s).update(extra)


class ListResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Any]
    has_more: bool = False


# ---------------------------------------------------------------------------------------
# Errors: the one body every 4xx/5xx carries (service.api.errors builds it)
# ---------------------------------------------------------------------------------------
class ErrorObject(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    # When a request had several problems: each one, e.g. {"param", "message"} or, for an
    # uploaded dataset, {"line", "field", "message"}.
    details: list[dict[str, Any]] | None = None


class ErrorResponse(BaseModel):
    error: ErrorObject


_ERROR_WHY: dict[int, str] = {
    400: "Invalid request: `error.param` names the field (and `error.details` every problem)",
    401: "Missing, malformed or invalid API key",
    404: "No such object (another tenant's objects answer 404 too)",
    409: "The object's state does not allow this",
    413: "Payload too large",
    429: "Server busy: retry after `Retry-After` seconds",
    500: "Internal error (logged on the server; no details in the answer)",
    503: "A dependency (inference engine, training queue, database) is unavailable: retry later",
    504: "The request timed out",
}
# What every authenticated route may answer besides its own codes.
COMMON_ERRORS = (400, 401, 500, 503)


def error_responses(*codes: int, common: bool = True) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` for these statuses (plus COMMON_ERRORS), each with the error body."""
    wanted = sorted(set(codes) | (set(COMMON_ERRORS) if common else set()))
    return {code: {"model": ErrorResponse, "description": _ERROR_WHY[code]} for code in wanted}


# ---------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------
class FilePublic(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"] = "processed"
    status_details: str | None = None
    expires_at: int | None = None
    # ours
    rows: int
    format: DatasetFormat | None = None  # null for files that are not datasets
    sha256: str

    @classmethod
    def from_domain(cls, f: FileInfo) -> "FilePublic":
        return cls(id=f.id, bytes=f.bytes, created_at=unix(f.created_at), filename=f.filename,
                   purpose=f.purpose, rows=f.rows, format=f.format, sha256=f.sha256)


class FileList(ListResponse):
    data: list[FilePublic]


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


# ---------------------------------------------------------------------------------------
# Fine-tuning jobs
# ---------------------------------------------------------------------------------------
def _hyperparameters_schema() -> dict[str, Any]:
    """`hyperparameters` as TrainingSpec.from_hyperparameters reads it: TrainingSpec's own
    fields (types, ranges, defaults: its JSON schema, not a copy) beside OpenAI's "auto" and
    learning_rate_multiplier. Validation stays in TrainingSpec (every problem reported with the
    request's others); this only states it."""
    spec = TrainingSpec.model_json_schema()
    props = dict(spec["properties"])
    for key in ("n_epochs", "batch_size"):
        props[key] = {"anyOf": [props[key], {"const": "auto"}], "default": props[key].get("default"),
                      "title": props[key].get("title")}
    props["learning_rate_multiplier"] = {
        "anyOf": [{"type": "number", "exclusiveMinimum": 0, "maximum": 1000}, {"const": "auto"}, {"type": "null"}],
        "title": "Learning Rate Multiplier",
        "description": f"OpenAI's name for the rate: learning_rate = {BASE_LEARNING_RATE:g} x this"}
    return {
        "type": "object", "properties": props, "additionalProperties": False,
        "description": "Every key is optional. micro_batch_size must not exceed batch_size (16 when left "
                       "out); max_steps, when given, wins over n_epochs.",
        # A numeric learning_rate_multiplier and a learning_rate name the same thing.
        "not": {"required": ["learning_rate", "learning_rate_multiplier"],
                "properties": {"learning_rate_multiplier": {"type": "number"}}},
    }


_HYPERPARAMETERS = WithJsonSchema({"anyOf": [_hyperparameters_schema(), {"type": "null"}]})


class SupervisedMethodIn(BaseModel):
    hyperparameters: Annotated[dict[str, Any] | None, _HYPERPARAMETERS] = None


class MethodIn(BaseModel):
    """OpenAI's `method`; only supervised fine-tuning exists here (routes/jobs.py says so for
    any other type, which the schema's enum states)."""
    type: str = Field(json_schema_extra={"enum": ["supervised"]})
    supervised: SupervisedMethodIn | None = None
    dpo: dict[str, Any] | None = None
    reinforcement: dict[str, Any] | None = None


def _spec_field_schema(name: str) -> WithJsonSchema:
    """A top-level key that lands in TrainingSpec (seed): its schema, or null."""
    field = dict(TrainingSpec.model_json_schema()["properties"][name])
    field.pop("default", None)
    return WithJsonSchema({"anyOf": [field, {"type": "null"}]})


# Exactly one training source, at most one validation source (null counts as absent).
_ONE_TRAINING_SOURCE = {
    "oneOf": [{"required": ["training_file"], "properties": {"training_file": {"type": "string", "minLength": 1}}},
              {"required": ["training_dataset"], "properties": {"training_dataset": {"type": "object"}}}],
    "not": {"anyOf": [
        {"required": ["validation_file", "validation_dataset"],
         "properties": {"validation_file": {"type": "string", "minLength": 1},
                        "validation_dataset": {"type": "object"}}},
        # hyperparameters at the top level or in method.supervised, not both
        {"required": ["hyperparameters", "method"],
         "properties": {"hyperparameters": {"type": "object"},
                        "method": {"type": "object", "required": ["supervised"], "properties": {"supervised": {
                            "type": "object", "required": ["hyperparameters"],
                            "properties": {"hyperparameters": {"type": "object"}}}}}}},
    ]},
}


class JobCreate(BaseModel):
    """POST /v1/fine_tuning/jobs. Shapes are checked here; meaning (files exist, model is
    ours, hyperparameters in range, ...) is checked together in serving_jobs.py so that one
    answer lists every problem. The schema states those rules too, so the spec says what is
    accepted (all but what lives on the server: which model, files and dataset paths exist)."""
    model_config = ConfigDict(extra="forbid", json_schema_extra=_ONE_TRAINING_SOURCE)

    model: str = Field(max_length=512, description="this service's base model (GET /v1/models, kind base)")
    training_file: str | None = Field(default=None, max_length=128,
                                      description="an uploaded file of purpose fine-tune; or training_dataset")
    validation_file: str | None = Field(default=None, max_length=128)
    # ours: a dataset the `datasets` library loads instead of an uploaded file
    training_dataset: DatasetSource | None = Field(
        default=None, description="instead of training_file: a hub dataset id, or an absolute path inside the "
                                  "server's dataset directories (TUNESERVE_DATASET_ROOTS)")
    validation_dataset: DatasetSource | None = None
    # OpenAI keys (n_epochs, batch_size, learning_rate_multiplier: number or "auto") and ours
    # (max_steps, learning_rate, lora_r, ... see TrainingSpec) side by side.
    hyperparameters: Annotated[dict[str, Any] | None, _HYPERPARAMETERS] = None
    method: MethodIn | None = None
    suffix: str | None = Field(default=None, max_length=64, json_schema_extra=_non_null(
        {"maxLength": SUFFIX_MAX_CHARS, "pattern": SUFFIX_PATTERN}))
    seed: Annotated[int | None, _spec_field_schema("seed")] = None
    metadata: dict[str, str] | None = Field(default=None, json_schema_extra=_non_null(
        {"maxProperties": MAX_METADATA_KEYS, "propertyNames": {"maxLength": MAX_METADATA_KEY_CHARS},
         "additionalProperties": {"type": "string", "maxLength": MAX_METADATA_VALUE_CHARS}}))
    integrations: list[dict[str, Any]] | None = Field(
        default=None, description="not supported: leave out, null or []",
        json_schema_extra=_non_null({"maxItems": 0}))


class OpenAIHyperparameters(BaseModel):
    n_epochs: int | float | Literal["auto"] | None = None
    batch_size: int | Literal["auto"] | None = None
    learning_rate_multiplier: float | Literal["auto"] | None = None


class JobErrorPublic(JobError):
    """The domain's JobError as is (OpenAI's job.error has the same three fields)."""

    @classmethod
    def from_domain(cls, e: JobError) -> "JobErrorPublic":
        return cls.model_validate(e.model_dump())


class JobPublic(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    status: str
    model: str
    fine_tuned_model: str | None = None
    created_at: int
    finished_at: int | None = None
    hyperparameters: OpenAIHyperparameters
    method: dict[str, Any]
    trained_tokens: int | None = None
    error: JobErrorPublic | None = None
    training_file: str | None = None
    validation_file: str | None = None
    seed: int
    suffix: str | None = None
    metadata: dict[str, str] | None = None
    organization_id: str = ORGANIZATION_ID
    result_files: list[str] = Field(default_factory=list)
    integrations: list[Any] | None = None
    estimated_finish: int | None = None
    # ours
    started_at: int | None = None
    cancel_requested: bool = False
    training_dataset: DatasetSource | None = None
    validation_dataset: DatasetSource | None = None
    progress: JobProgress
    spec: TrainingSpec
    result: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def from_domain(cls, job: Job) -> "JobPublic":
        spec = job.spec
        hp = OpenAIHyperparameters(
            n_epochs=_num(spec.n_epochs),
            batch_size=spec.batch_size,
            learning_rate_multiplier=spec.learning_rate / BASE_LEARNING_RATE,
        )
        estimated = None
        if not job.status.is_final and job.progress.eta_seconds is not None \
                and math.isfinite(job.progress.eta_seconds):
            estimated = int(datetime.now(timezone.utc).timestamp() + job.progress.eta_seconds)
        return cls(
            id=job.id, status=job.status.value, model=job.model, fine_tuned_model=job.fine_tuned_model,
            created_at=unix(job.created_at), finished_at=unix(job.finished_at),
            hyperparameters=hp,
            method={"type": "supervised", "supervised": {"hyperparameters": hp.model_dump()}},
            trained_tokens=job.trained_tokens,
            error=JobErrorPublic.from_domain(job.error) if job.error else None,
            training_file=job.training_file, validation_file=job.validation_file,
            seed=spec.seed, suffix=job.suffix, metadata=job.metadata,
            result_files=list(job.result.get("result_files") or []),
            estimated_finish=estimated, started_at=unix(job.started_at),
            cancel_requested=job.cancel_requested,
            training_dataset=job.training_dataset, validation_dataset=job.validation_dataset,
            progress=job.progress, spec=spec, result=result_summary(job.result),
        )


class JobList(ListResponse):
    data: list[JobPublic]


class JobEventPublic(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"] = "message"
    data: dict[str, Any] | None = None

    @classmethod
    def from_domain(cls, e: JobEvent) -> "JobEventPublic":
        return cls(id=e.id, created_at=unix(e.created_at), level=e.level, message=e.message,
                   type=e.type, data=e.data)


class JobEventList(ListResponse):
    data: list[JobEventPublic]


class CheckpointMetrics(BaseModel):
    model_config = ConfigDict(extra="allow")
    step: float | None = None
    train_loss: float | None = None
    valid_loss: float | None = None


class CheckpointPublic(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    step_number: int
    metrics: CheckpointMetrics


class CheckpointList(ListResponse):
    data: list[CheckpointPublic]
    first_id: str | None = None
    last_id: str | None = None


# ---------------------------------------------------------------------------------------
# Models and adapters
# ---------------------------------------------------------------------------------------
class ModelPublic(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    # ours
    kind: Literal["base", "adapter"]
    base_model: str | None = None
    version: int | None = None


class ModelList(ListResponse):
    data: list[ModelPublic]


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool = True


# What a client sees of a manifest: all but the tenant (implied by the key), the fingerprint
# (a server-side check) and created_at (re-typed as unix seconds below).
_ADAPTER_PUBLIC_FIELDS = ("name", "version", "base_model", "model_family", "target_modules", "r", "lora_alpha",
                          "job_id", "files", "training", "metrics")


class _AdapterPublicBase(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    created_at: int

    @classmethod
    def from_domain(cls, m: AdapterManifest, base_model: str | None = None) -> "AdapterPublic":
        """`base_model`: the base's public id when the caller knows it (older manifests may
        hold a host path)."""
        fields = m.model_dump(include=set(_ADAPTER_PUBLIC_FIELDS))
        if base_model:
            fields["base_model"] = base_model
        fields["metrics"] = metrics_summary(fields.get("metrics"))  # the rows: /v1/adapters/{name}/samples
        return cls(id=m.model_id, created_at=unix(m.created_at), **fields)


# The manifest's own field definitions (types, defaults), so the two cannot drift apart.
AdapterPublic = create_model(
    "AdapterPublic", __base__=_AdapterPublicBase, __doc__="A registry manifest minus the tenant.",
    **{f: (AdapterManifest.model_fields[f].annotation, AdapterManifest.model_fields[f])
       for f in _ADAPTER_PUBLIC_FIELDS})


class AdapterList(ListResponse):
    data: list[AdapterPublic]


class SamplePublic(BaseModel):
    """One evaluation prompt: the reference reply, the base model's and the adapter's (greedy)."""
    model_config = ConfigDict(extra="allow")
    prompt: str = ""
    reference: str = ""
    base: str = ""
    adapter: str = ""


class SampleList(ListResponse):
    """The before/after table of a job's evaluation (ours; lists and job views carry only scores)."""
    data: list[SamplePublic]
    split: str | None = None
    n_samples: int = 0

    @classmethod
    def from_metrics(cls, metrics: dict[str, Any] | None, limit: int | None = None) -> "SampleList":
        rows = metrics_samples(metrics)
        quality = (metrics or {}).get("quality") if isinstance((metrics or {}).get("quality"), dict) else {}
        shown = rows[:limit] if limit is not None else rows
        return cls(data=[SamplePublic.model_validate(r) for r in shown], has_more=len(shown) < len(rows),
                   split=quality.get("split"), n_samples=len(rows))


class AdapterDeleted(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    deleted: bool = True
    versions: list[int] = Field(default_factory=list)


# ---------------------------------------------------------------------------------------
# Webhook endpoints (the shapes of the `openai` SDK's client.webhooks)
# ---------------------------------------------------------------------------------------
_PRINTABLE = r"^[^\x00-\x1f\x7f]+$"  # no control characters (PostgreSQL refuses NUL in text)


# The types serving_webhooks accepts (runtime fields stay `str`: an unsupported type is refused
# naming it there, not by pydantic); the schema states the enum.
_EVENT_TYPE = {"type": "string", "enum": [t.value for t in WebhookEventType]}
# What core.webhooks.check_url_shape accepts, as a pattern (ASCII hosts; a port 0..65535): http(s),
# a host, no credentials, no spaces or control characters. In production a host must also resolve
# to public addresses (TUNESERVE_WEBHOOK_ALLOW_PRIVATE_URLS), which no schema can state.
_URL = {"pattern": r"^https?://[A-Za-z0-9.-]+(:(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}"
                   r"|[1-5][0-9]{4}|[0-9]{1,4}))?([/?#][\x21-\x7e]*)?$", "maxLength": MAX_URL_LENGTH}


class WebhookEndpointCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    event_types: list[str] = Field(min_length=1, max_length=32, json_schema_extra={"items": _EVENT_TYPE})
    name: str = Field(min_length=1, max_length=256, pattern=_PRINTABLE)
    url: str = Field(min_length=1, max_length=4096, json_schema_extra=_URL)


class WebhookEndpointUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    event_types: list[str] | None = Field(default=None, min_length=1, max_length=32,
                                          json_schema_extra=_non_null({"items": _EVENT_TYPE}))
    name: str | None = Field(default=None, min_length=1, max_length=256, pattern=_PRINTABLE)
    url: str | None = Field(default=None, min_length=1, max_length=4096, json_schema_extra=_non_null(_URL))


class WebhookRotateSecret(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keep_old_secret_active_for_24_hours: bool = False


class WebhookTestCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    event_type: str = Field(max_length=128, json_schema_extra=_EVENT_TYPE)


class WebhookEndpointPublic(BaseModel):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    created_at: int
    event_types: list[WebhookEventType]
    name: str
    signing_secret_hint: str | None = None
    url: str
    updated_at: int | None = None

    @classmethod
    def fields_from(cls, e: WebhookEndpoint) -> dict[str, Any]:
        return {"id": e.id, "created_at": unix(e.created_at), "event_types": e.event_types, "name": e.name,
                "signing_secret_hint": secret_hint(e.secret), "url": e.url, "updated_at": unix(e.updated_at)}

    @classmethod
    def from_domain(cls, e: WebhookEndpoint) -> "WebhookEndpointPublic":
        return cls(**cls.fields_from(e))


class WebhookEndpointWithSecret(WebhookEndpointPublic):
    """Create and rotate only: the one time the whole secret is shown."""
    signing_secret: str

    @classmethod
    def from_domain(cls, e: WebhookEndpoint) -> "WebhookEndpointWithSecret":
        return cls(**cls.fields_from(e), signing_secret=e.secret)


class WebhookEndpointList(ListResponse):
    data: list[WebhookEndpointPublic]
    first_id: str | None = None
    last_id: str | None = None


class WebhookEndpointDeleted(BaseModel):
    id: str
    object: Literal["webhook_endpoint.deleted"] = "webhook_endpoint.deleted"
    deleted: bool = True


class WebhookTestResult(BaseModel):
    event_type: WebhookEventType
    object: Literal["webhook_endpoint.test"] = "webhook_endpoint.test"
    status_code: int
    success: Literal[True] = True  # the request completed; status_code says how the endpoint answered
    webhook_endpoint_id: str
    # ours
    delivery_id: str


class WebhookEventTypeList(BaseModel):
    object: Literal["list"] = "list"
    data: list[WebhookEventType]


class WebhookDeliveryPublic(BaseModel):
    """Ours: one entry of an endpoint's delivery log. `id` is the `webhook-id` header."""
    id: str
    object: Literal["webhook_endpoint.delivery"] = "webhook_endpoint.delivery"
    webhook_endpoint_id: str
    event_id: str
    event_type: WebhookEventType
    status: DeliveryStatus
    attempts: int
    created_at: int
    last_attempt_at: int | None = None
    next_attempt_at: int | None = None
    last_status_code: int | None = None
    last_error: str | None = None
    delivered_at: int | None = None
    test: bool = False

    @classmethod
    def from_domain(cls, d: WebhookDelivery) -> "WebhookDeliveryPublic":
        return cls(id=d.id, webhook_endpoint_id=d.endpoint_id, event_id=d.event_id, event_type=d.event_type,
                   status=d.status, attempts=d.attempts, created_at=unix(d.created_at),
                   last_attempt_at=unix(d.last_attempt_at),
                   next_attempt_at=unix(d.next_attempt_at) if d.status is DeliveryStatus.pending else None,
                   last_status_code=d.last_status_code, last_error=d.last_error,
                   delivered_at=unix(d.delivered_at), test=d.test)


class WebhookDeliveryList(ListResponse):
    data: list[WebhookDeliveryPublic]
    first_id: str | None = None
    last_id: str | None = None


# ---------------------------------------------------------------------------------------
# Chat
# ---------------------------------------------------------------------------------------
# 2**63 - 1 has no double: a client (or fuzzer) holding numbers as doubles sends 2**63 for it,
# which the server refuses. The spec states the largest seed every JSON reader keeps exactly below it.
_SEED_SCHEMA = _non_null({"maximum": 2**63 - 1024})


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str = Field(max_length=1_000_000)


class ChatMessageIn(BaseModel):
    # OpenAI roles; developer -> system and tool -> observation (ChatGLM3's tool-result role).
    role: Literal["system", "developer", "user", "assistant", "tool", "observation"]
    content: str | list[ContentPart] | None = Field(default=None)
    name: str | None = None

    # Only an assistant turn may leave content out (OpenAI: a tool-call turn); the rest is
    # refused with 400 (serving_chat.to_domain_messages), so the spec says so.
    model_config = ConfigDict(json_schema_extra={
        "if": {"properties": {"role": {"not": {"const": "assistant"}}}},
        "then": {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}},
    })


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionCreate(BaseModel):
    model: str = Field(max_length=512)
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=4096)
    max_tokens: int | None = Field(default=None, ge=1, le=32768)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=32768)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0, le=100_000)
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1, json_schema_extra=_SEED_SCHEMA)
    n: int | None = Field(default=None, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=256)
    # Accepted for SDK compatibility and not otherwise used.
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    logprobs: bool | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> "Usage":
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)

    @classmethod
    def from_domain(cls, r: GenerationResult) -> "Usage":
        return cls.of(r.prompt_tokens, r.completion_tokens)


def finish_reason(reason: str | None) -> Literal["stop", "length"] | None:
    """OpenAI knows stop/length; a cancelled or timed-out generation ends as "stop" on the wire."""
    if reason is None:
        return None
    return "length" if reason == "length" else "stop"


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class ChatCompletion(BaseModel):
    """OpenAI's chat.completion, built from the engine's GenerationResult."""
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: None = None
    choices: list[ChatChoice]
    usage: Usage

    @classmethod
    def from_domain(cls, result: GenerationResult, *, id: str, created: int, model: str) -> "ChatCompletion":
        return cls(id=id, created=created, model=model, usage=Usage.from_domain(result),
                   choices=[ChatChoice(message=AssistantMessage(content=result.text),
                                       finish_reason=finish_reason(result.finish_reason))])


class ChatDelta(BaseModel):
    """A chunk's delta: only the keys that changed (role once, then content; {} at the end)."""
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _only_set(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """OpenAI's chat.completion.chunk (one SSE event). `usage` only on the usage chunk."""
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: None = None
    choices: list[ChunkChoice]
    usage: Usage | None = None

    def sse(self) -> str:
        body = self.model_dump_json(exclude={"usage"} if self.usage is None else None)
        return f"data: {body}\n\n"


class SimpleChatCreate(BaseModel):
    """POST /chat: the lecture's ChatGLM3 `model.chat` call over HTTP."""
    adapter: str | None = Field(default=None, max_length=512)  # null / "" = the base model
    query: str = Field(max_length=1_000_000)
    # [{"role", "content"}, ...] or ChatGLM-style [[query, answer], ...]
    history: list[ChatMessageIn] | list[tuple[str, str]] | None = None
    max_new_tokens: int = Field(default=256, ge=1, le=32768)
    temperature: float = Field(default=0.8, ge=0, le=2)
    top_p: float = Field(default=0.8, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1, json_schema_extra=_SEED_SCHEMA)


class SimpleChatResponse(BaseModel):
    response: str
    history: list[dict[str, str]] | list[list[str]]
    usage: Usage
    model: str
    finish_reason: str


# ---------------------------------------------------------------------------------------
# API keys of the caller's tenant (ours; the operator's `tuneserve keys` works on every tenant)
# ---------------------------------------------------------------------------------------
class ApiKeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, min_length=1, max_length=128, pattern=_PRINTABLE)


class ApiKeyPublic(BaseModel):
    """A key as listed: its first characters only (only a hash of the whole key is stored)."""
    id: str
    object: Literal["api_key"] = "api_key"
    name: str | None = None
    prefix: str
    created_at: int
    revoked_at: int | None = None

    @classmethod
    def from_domain(cls, k: ApiKeyInfo) -> "ApiKeyPublic":
        return cls(id=k.id, name=k.name, prefix=k.prefix, created_at=unix(k.created_at) or 0,
                   revoked_at=unix(k.revoked_at))


class ApiKeyWithSecret(ApiKeyPublic):
    """Create only: the one time the whole key is shown."""
    key: str


class ApiKeyList(ListResponse):
    data: list[ApiKeyPublic]
