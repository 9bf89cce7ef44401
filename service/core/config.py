"""The one Settings object. Every deployment knob is a TUNESERVE_* environment variable."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

CHATGLM3_HUB_ID = "THUDM/chatglm3-6b"
DEMO_MODEL_NAME = "tuneserve-demo-chatglm3-tiny"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNESERVE_", env_file=".env", extra="ignore")

    env: Literal["dev", "prod"] = "dev"
    host: str = "127.0.0.1"
    port: int = 8000
    # How long the API keeps an idle keep-alive connection open. It must outlast the clients'
    # own idle expiry (httpx and the OpenAI SDK: 5 s), so that the client always drops an idle
    # connection first: with both at 5 s (uvicorn's default) the server closed connections a
    # client had just sent a request on, and the client saw a reset (ReadError) under load.
    keep_alive_s: int = Field(default=75, ge=1)

    # Base model: hub id or local dir. Empty = auto (ChatGLM3-6B with a CUDA GPU, else the demo model).
    base_model: str = ""
    # Operator-only allow-list for executing a model repository's own code (never from a request).
    # NoDecode: these are comma-separated in the environment, not JSON.
    trust_remote_code_models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    load_in_4bit: bool = True
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"

    data_dir: Path = Path(".tuneserve")
    database_url: str = ""  # default: sqlite file under data_dir
    redis_url: str = "redis://127.0.0.1:6379/0"
    registry_dir: Path | None = None  # default: data_dir/adapters

    # "key:tenant,key2:tenant2"; hashed into the key store at startup.
    api_keys: str = ""

    # Local directories a job's `training_dataset.path` may name (comma-separated); hub ids
    # are always allowed. Empty = data_dir/datasets only.
    dataset_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    # /metrics (Prometheus, unauthenticated, aggregates only); false = 404.
    metrics_enabled: bool = True

    # Upload limits, enforced while streaming.
    max_upload_bytes: int = 512 * 1024 * 1024
    max_upload_rows: int = 2_000_000
    max_line_bytes: int = 1024 * 1024
    max_json_depth: int = 8

    # Inference engine.
    engine_enabled: bool = True
    max_batch_size: int = 32
    max_queue: int = 256
    max_seq_len: int = 2048
    request_timeout_s: float = 300.0
    adapter_gpu_budget_bytes: int = 512 * 1024 * 1024
    adapter_cpu_cache_size: int = 64
    # Registry reads (read + sha256 + parse) in parallel: cold requests for N adapters wait for
    # ceil(N / threads) loads in a row (8 cold adapters at 2 threads: 4 loads, max TTFT 251 ms
    # on an H200 in bench/results/h200-2026-12-02-mma/serving.json).
    adapter_loader_threads: int = Field(default=8, ge=1, le=64)
    preload_adapters: Annotated[list[str], NoDecode] = Field(default_factory=list)  # "tenant/name": loaded at start, pinned
    # Decode-step speed on CUDA (ignored on CPU): replay each step shape as a CUDA graph;
    # optionally torch.compile the step first.
    cuda_graphs: bool = True
    # NF4 matmuls of nf4_kernel_min_rows..nf4_kernel_max_rows rows through our Triton kernel
    # (service/inference/kernels: NF4 within bf16 rounding, CUDA only); other row counts and
    # shapes stay bitsandbytes'. The default range is where ours is faster on an H200
    # (bench/results/h200-2026-12-03b/kernels_fma_pair_prefetch.json, "floor", one-dot kernel
    # "ours_mma_swept" vs bitsandbytes: a decode step's NF4 matmuls at 8 rows 3.45 vs 10.38 ms,
    # 32 rows 4.07 vs 10.33, 128 rows 7.24 vs 10.91); bitsandbytes wins at 1 row (its GEMV,
    # 2.94 vs 3.64; our CUDA-core kernel reached 3.14, bench/results/h200-2026-12-03b).
    nf4_kernels: bool = True
    nf4_kernel_min_rows: int = Field(default=2, ge=1, le=128)
    nf4_kernel_max_rows: int = Field(default=128, ge=1, le=128)
    # Opt-in: the multi-LoRA term through our Triton kernels (CUDA only): an attention's q/k/v
    # terms as one shrink + one expand together, other modules two launches each, instead of
    # PyTorch's two GEMMs + multiply + add per module. Decode steps are faster with it (H200,
    # bench/results/h200-2026-12-03b/serving_lora_grouped.json: one adapter stream 178 -> 201
    # tok/s, 32-stream step p50 7.57 -> 6.75 ms), but first tokens were slower in that call (the
    # kernels compile on first use, not at engine start; the 32-stream run's first tokens
    # 0.22 -> 0.88 s), so it stays off until measured again: since then the kernels compile at
    # engine start and no longer specialise on row / column counts (not yet measured on a GPU).
    lora_kernels: bool = False
    # RMSNorm and the rotary embedding of GLM / Llama-family bases through our fused kernels
    # (service/inference/kernels/fused.py; CUDA only): one kernel each instead of ~8 and ~20.
    fused_ops: bool = True
    # Opt-in: a decode step's attention block in two Triton kernels per layer (CUDA only): the
    # rotary of q and k with the KV-cache write (bit-identical to rotate + update), then the
    # attention over the slot cache (service/inference/kernels/attention.py), instead of about
    # eleven launches. Interpreter-tested; not yet measured on a GPU, hence off.
    decode_attention_kernel: bool = False
    torch_compile: bool = False

    # Workers.
    heartbeat_interval_s: float = 10.0
    heartbeat_timeout_s: float = 120.0
    task_queue: str = "training"
    # A worker killed mid-job: its unacked Redis message returns after visibility_timeout, and
    # independently the reaper requeues a running job whose heartbeat is older than
    # heartbeat_timeout_s. Either path resumes from the last checkpoint (see workers/celery_app.py).
    broker_visibility_timeout_s: float = 3600.0
    job_max_attempts: int = 3  # runs of one job (first + redeliveries) before failing worker_lost
    reaper_interval_s: float = 15.0
    # The API sweeps too, so a job is never left `running` when every worker is gone.
    api_reaper: bool = True
    requeue_grace_s: float = 60.0  # a queued job missing from the broker this long is re-sent

    # Webhooks (/v1/webhook_endpoints). Deliveries leave from the store's outbox, sent by a thread
    # in every worker and (webhook_dispatcher) in the API; several senders at once are safe.
    webhook_dispatcher: bool = True
    webhook_interval_s: float = Field(default=2.0, gt=0)  # how often the outbox is swept
    webhook_timeout_s: float = Field(default=5.0, gt=0, le=60)  # per attempt; redirects are not followed
    webhook_max_attempts: int = Field(default=8, ge=1, le=100)
    webhook_backoff_base_s: float = Field(default=5.0, gt=0)  # retry k waits base * 2**(k-1) ...
    webhook_backoff_max_s: float = Field(default=3600.0, gt=0)  # ... at most this
    # With env=prod, loopback/private/link-local targets are refused unless this is set.
    webhook_allow_private_urls: bool = False

    @field_validator("trust_remote_code_models", "preload_adapters", "dataset_roots", mode="before")
    @classmethod
    def _split_csv(cls, value):
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @model_validator(mode="after")
    def _refuse_unsafe(self) -> "Settings":
        local = self.host in ("127.0.0.1", "localhost", "::1")
        if not local and not self.api_keys:
            raise ValueError(
                f"refusing to bind {self.host} without API keys: set TUNESERVE_API_KEYS=key:tenant,... "
                "(or bind 127.0.0.1)"
            )
        return self

    @property
    def webhook_private_urls_allowed(self) -> bool:
        return self.env != "prod" or self.webhook_allow_private_urls

    # Derived paths -----------------------------------------------------------------
    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'tuneserve.db').absolute()}"

    @property
    def resolved_registry_dir(self) -> Path:
        return (self.registry_dir or self.data_dir / "adapters").absolute()

    @property
    def resolved_dataset_roots(self) -> list[Path]:
        """Where a job's `training_dataset.path` may point on this host (besides hub names);
        the API checks against these at creation, the worker again before reading."""
        return [Path(r).absolute() for r in self.dataset_roots] or [(self.data_dir / "datasets").absolute()]

    @property
    def files_dir(self) -> Path:
        return (self.data_dir / "files").absolute()

    @property
    def jobs_dir(self) -> Path:
        return (self.data_dir / "jobs").absolute()

    @property
    def models_dir(self) -> Path:
        """Converted / generated model checkpoints (ChatGLM3 conversion cache, demo model)."""
        return (self.data_dir / "models").absolute()

    def parsed_api_keys(self) -> dict[str, str]:
        """key -> tenant."""
        out: dict[str, str] = {}
        for pair in filter(None, (p.strip() for p in self.api_keys.split(","))):
            key, _, tenant = pair.partition(":")
            if not key or not tenant:
                raise ValueError("TUNESERVE_API_KEYS entries must look like key:tenant")
            if not all("!" <= ch <= "~" for ch in key) or len(key) > 512:
                # A bearer key is visible ASCII with nothing around it (service.api.deps.bearer_key).
                raise ValueError("TUNESERVE_API_KEYS: a key must be 1..512 visible ASCII characters, "
                                 "no whitespace")
            out[key] = tenant
        return out


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
