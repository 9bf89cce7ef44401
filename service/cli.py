"""`tuneserve`: run the service (up, api, worker), drive it (jobs, adapters, chat) and
operate it (keys, convert-chatglm3, adapters export).

Server commands read every deployment setting from TUNESERVE_* variables (Settings).
Client commands talk HTTP to --url (TUNESERVE_URL) with --api-key (TUNESERVE_API_KEY,
else the key `tuneserve up` saved under TUNESERVE_DATA_DIR). Operator commands (keys,
adapters export) work on the store / registry directly and need no running server.

Heavy imports (torch, transformers, the API app) happen inside the commands that need
them, so `tuneserve --help` and the client commands start fast.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Column, Table

from service.cli_client import DEFAULT_URL, ApiClient, CliError, resolve_api_key

console = Console()
err_console = Console(stderr=True)

app = typer.Typer(name="tuneserve", no_args_is_help=True, add_completion=False,
                  help="Fine-tune LoRA adapters on one shared 4-bit base model and chat with them.")
jobs_app = typer.Typer(no_args_is_help=True, help="Fine-tuning jobs (through the HTTP API).")
adapters_app = typer.Typer(no_args_is_help=True, help="Published adapters.")
keys_app = typer.Typer(no_args_is_help=True,
                       help="API keys (operator-only: works on the store of TUNESERVE_DATABASE_URL directly).")
app.add_typer(jobs_app, name="jobs")
app.add_typer(adapters_app, name="adapters")
app.add_typer(keys_app, name="keys")

FINAL_STATUSES = {"succeeded", "failed", "cancelled"}
STATUS_STYLE = {"succeeded": "green", "failed": "red", "cancelled": "yellow", "running": "cyan",
                "queued": "blue", "validating_files": "blue"}

UrlOpt = Annotated[str, typer.Option("--url", envvar="TUNESERVE_URL", help="tuneserve API base URL.")]
KeyOpt = Annotated[Optional[str], typer.Option(
    "--api-key", envvar="TUNESERVE_API_KEY", show_default=False,
    help="API key (default: the key `tuneserve up` saved in $TUNESERVE_DATA_DIR/api_key).")]


# ---------------------------------------------------------------------------------------
# Shared plumbing
# ---------------------------------------------------------------------------------------
def _client(ctx: typer.Context, url: str, api_key: str | None) -> ApiClient:
    obj = ctx.obj if isinstance(ctx.obj, dict) else {}
    return ApiClient(url, resolve_api_key(api_key), http=obj.get("http"))


def _fail(message: str, code: int = 1) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    return typer.Exit(code)


def _settings(**overrides: Any):
    """Settings (command-line overrides win over TUNESERVE_*), with validation errors shown as
    one readable line instead of a traceback."""
    from pydantic import ValidationError

    from service.core.config import Settings
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise _fail(f"invalid TUNESERVE_* settings: {problems}")


def _print_table(table: Table) -> None:
    # Ids must stay whole (they are copied into the next command); pipes get a wide table.
    (console if console.is_terminal else Console(width=max(console.width, 160))).print(table)


def _ts(value: Any) -> str:
    """OpenAI objects carry unix seconds; show local time."""
    if value in (None, ""):
        return "-"
    try:
        return datetime.fromtimestamp(float(value), tz=timezone.utc).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    except (TypeError, ValueError):
        return str(value)


def _status(status: str) -> str:
    return f"[{STATUS_STYLE.get(status, 'white')}]{status}[/]"


def _progress(job: dict[str, Any]) -> dict[str, Any]:
    """Our progress extras on the job object (step, total_steps, loss, eta_seconds, ...)."""
    progress = job.get("progress")
    return progress if isinstance(progress, dict) else {}


def _fmt_eta(seconds: Any) -> str:
    if seconds is None:
        return "ETA -"
    seconds = int(max(0, float(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"ETA {h}:{m:02d}:{s:02d}" if h else f"ETA {m}:{s:02d}"


def _parse_hp(pairs: list[str]) -> dict[str, Any]:
    """`--hp key=value`: values parse as JSON when they can (numbers, true, lists), else strings."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise _fail(f"--hp expects key=value, got {pair!r}")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        out[key.strip()] = value
    return out


def _run_client(fn):
    """Turn CliError into a red one-liner and its exit code."""
    try:
        return fn()
    except CliError as exc:
        raise _fail(exc.message, exc.exit_code)


# ---------------------------------------------------------------------------------------
# Server processes
# ---------------------------------------------------------------------------------------
@app.command()
def up(host: Annotated[Optional[str], typer.Option(help="Bind address (TUNESERVE_HOST).")] = None,
       port: Annotated[Optional[int], typer.Option(help="Port (TUNESERVE_PORT).")] = None,
       worker: Annotated[bool, typer.Option(help="Also start one training worker.")] = True,
       max_restarts: Annotated[int, typer.Option(min=0, help="Crashes of one child restarted within "
                                                 "--restart-window; one more and `up` gives up.")] = 5,
       restart_window: Annotated[float, typer.Option(min=1, help="Seconds over which crashes count.")] = 60.0,
       restart_backoff: Annotated[float, typer.Option(min=0, help="First restart delay in seconds; "
                                                      "doubles per crash in the window.")] = 1.0):
    """The embedded default: Redis check/start, API (+ dashboard) and one training worker,
    supervised (a crashed child is restarted with backoff)."""
    from service.launcher import Launcher, LaunchError, RestartPolicy
    overrides = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    policy = RestartPolicy(max_restarts=max_restarts, window_s=restart_window, backoff_s=restart_backoff)
    try:
        code = Launcher(console=console, with_worker=worker, overrides=overrides, policy=policy).run()
    except LaunchError as exc:
        raise _fail(str(exc))
    raise typer.Exit(code)


@app.command()
def api(host: Annotated[Optional[str], typer.Option(help="Bind address (TUNESERVE_HOST).")] = None,
        port: Annotated[Optional[int], typer.Option(help="Port (TUNESERVE_PORT).")] = None,
        log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info"):
    """Run the HTTP API (OpenAI-compatible routes, chat engine, dashboard) in this process."""
    settings = _settings(host=host, port=port)  # through Settings, so its non-local-bind check applies
    import uvicorn

    from service.api.app import create_app
    from service.logging import configure_logging
    configure_logging("api", log_level)  # JSON lines with request ids (service/logging.py)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=log_level,
                timeout_graceful_shutdown=10, timeout_keep_alive=settings.keep_alive_s,
                log_config=None, access_log=False)


def worker_argv(queue: str, concurrency: int, loglevel: str = "INFO") -> list[str]:
    """One solo process per GPU by default: the model and CUDA context live in that process."""
    pool = ["--pool=solo", "-c", "1"] if concurrency <= 1 else ["--pool=prefork", "-c", str(concurrency)]
    # `python -m service.logging` is Celery's CLI with our structured logging installed first.
    return [sys.executable, "-m", "service.logging", "-A", "workers.celery_app", "worker", "-Q", queue, *pool,
            f"--loglevel={loglevel}", "--without-gossip", "--without-mingle"]


@app.command()
def worker(queue: Annotated[Optional[str], typer.Option(help="Celery queue (TUNESERVE_TASK_QUEUE).")] = None,
           concurrency: Annotated[int, typer.Option(min=1, help="Training processes (1 per GPU).")] = 1,
           loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO"):
    """Run a training worker (Celery, queue `training`) in place of this process."""
    settings = _settings()
    argv = worker_argv(queue or settings.task_queue, concurrency, loglevel)
    sys.stdout.flush()
    os.execv(argv[0], argv)  # the worker gets our pid, so signals reach Celery directly


@app.command("convert-chatglm3")
def convert_chatglm3_cmd(src: Annotated[str, typer.Argument(help="ChatGLM3 checkpoint dir (or hub id).")],
                         dst: Annotated[Path, typer.Argument(help="Output dir (native GLM format).")]):
    """Convert a ChatGLM3 checkpoint to transformers' native GLM layout (no remote code)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from service.core.errors import TuneserveError
    convert = _import_converter()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("converting", total=None)

        def progress(done: int, total: int | None = None, *args: Any, **kwargs: Any) -> None:
            bar.update(task, completed=done, total=total)

        try:
            out = convert(src, dst, progress=progress)
        except (TuneserveError, OSError, ValueError) as exc:
            raise _fail(f"conversion failed: {exc}")
    console.print(f"[green]converted[/] {src} -> {out or dst}")


def _import_converter():
    try:
        from service.models.chatglm3 import convert_chatglm3
    except ImportError:
        try:
            from service.models import convert_chatglm3  # type: ignore[attr-defined, no-redef]
        except ImportError as exc:
            raise _fail(f"the ChatGLM3 converter is not available in this build ({exc})")
    return convert_chatglm3


# ---------------------------------------------------------------------------------------
# jobs
# ---------------------------------------------------------------------------------------
@jobs_app.command("create")
def jobs_create(ctx: typer.Context,
                file: Annotated[Optional[Path], typer.Option("--file", exists=True, dir_okay=False,
                                                             help="Training JSONL to upload first.")] = None,
                training_file: Annotated[Optional[str], typer.Option(help="An uploaded file id (file-...).")] = None,
                validation: Annotated[Optional[Path], typer.Option(exists=True, dir_okay=False,
                                                                  help="Validation JSONL to upload.")] = None,
                validation_file: Annotated[Optional[str], typer.Option(help="An uploaded validation file id.")] = None,
                model: Annotated[Optional[str], typer.Option(help="Base model (default: the server's).")] = None,
                suffix: Annotated[Optional[str], typer.Option(help="Adapter name suffix.")] = None,
                seed: Annotated[Optional[int], typer.Option(help="Random seed.")] = None,
                hp: Annotated[Optional[list[str]], typer.Option("--hp", help="Hyperparameter key=value (repeatable), "
                                                      "e.g. --hp max_steps=50 --hp lora_r=8.")] = None,
                follow: Annotated[bool, typer.Option("--follow", help="Follow the job until it ends.")] = False,
                url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None):
    """Create a fine-tuning job (uploading --file first if given)."""
    if bool(file) == bool(training_file):
        raise _fail("give exactly one of --file PATH or --training-file ID")
    hyperparameters = _parse_hp(hp or [])

    def run() -> str:
        with _client(ctx, url, api_key) as c:
            train_id = training_file
            if file is not None:
                uploaded = c.upload_file(file)
                train_id = uploaded["id"]
                console.print(f"uploaded {file} -> [bold]{train_id}[/] ({uploaded.get('bytes', '?')} bytes)")
            val_id = validation_file
            if validation is not None:
                val_id = c.upload_file(validation)["id"]
                console.print(f"uploaded {validation} -> [bold]{val_id}[/]")
            body: dict[str, Any] = {"model": model or c.default_base_model(), "training_file": train_id}
            for key, value in (("validation_file", val_id), ("suffix", suffix), ("seed", seed)):
                if value is not None:
                    body[key] = value
            if hyperparameters:
                body["hyperparameters"] = hyperparameters
            job = c.post("/v1/fine_tuning/jobs", body)
            console.print(f"created [bold]{job['id']}[/] ({_status(job['status'])}) on {job.get('model')}")
            return job["id"]

    job_id = _run_client(run)
    if follow:
        jobs_follow(ctx, job_id, url=url, api_key=api_key)
    else:
        console.print(f"follow it with: tuneserve jobs follow {job_id}")


@jobs_app.command("list")
def jobs_list(ctx: typer.Context,
              limit: Annotated[int, typer.Option(min=1, max=100)] = 20,
              after: Annotated[Optional[str], typer.Option(help="Cursor: last job id of the previous page.")] = None,
              as_json: Annotated[bool, typer.Option("--json", help="Raw JSON.")] = False,
              url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None):
    """List jobs, newest first."""
    def run():
        with _client(ctx, url, api_key) as c:
            return c.get("/v1/fine_tuning/jobs", limit=limit, after=after)

    page = _run_client(run)
    if as_json:
        console.print_json(data=page)
        return
    table = Table(Column("id", no_wrap=True, min_width=30), "status", "model", "fine_tuned_model", "progress",
                  "created")
    for job in page.get("data", []):
        p = _progress(job)
        step = f"{p.get('step', 0)}/{p.get('total_steps') or '?'}" if p else "-"
        table.add_row(job["id"], _status(job["status"]), str(job.get("model")),
                      job.get("fine_tuned_model") or "-", step, _ts(job.get("created_at")))
    _print_table(table)
    if page.get("has_more") and page.get("data"):
        console.print(f"more: tuneserve jobs list --after {page['data'][-1]['id']}")


@jobs_app.command("get")
def jobs_get(ctx: typer.Context, job_id: str, url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None):
    """Show one job as JSON."""
    def run():
        with _client(ctx, url, api_key) as c:
            return c.get(f"/v1/fine_tuning/jobs/{job_id}")
    console.print_json(data=_run_client(run))


@jobs_app.command("cancel")
def jobs_cancel(ctx: typer.Context, job_id: str, url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None):
    """Cancel a job (a running one stops at its next step)."""
    def run():
        with _client(ctx, url, api_key) as c:
            return c.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    job = _run_client(run)
    console.print(f"{job['id']}: {_status(job['status'])}")


@jobs_app.command("follow")
def jobs_follow(ctx: typer.Context, job_id: str,
                interval: Annotated[float, typer.Option(min=0.01, help="Seconds between polls.")] = 1.0,
                url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None):
    """Live progress (step/total, loss, ETA) and events until the job ends; exit 0 only if it succeeded."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    def run() -> dict[str, Any]:
        seen: set[str] = set()
        with _client(ctx, url, api_key) as c, Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[eta]}"),
                TimeElapsedColumn(), console=console) as bar:
            task = bar.add_task(job_id, total=None, loss="-", eta="ETA -")
            shown_phase = ""
            while True:
                job = c.get(f"/v1/fine_tuning/jobs/{job_id}")
                events = c.get(f"/v1/fine_tuning/jobs/{job_id}/events", limit=100).get("data", [])
                # The API lists newest first; show what is new, oldest first, above the bar.
                for ev in sorted((e for e in events if e["id"] not in seen), key=lambda e: e.get("created_at", 0)):
                    seen.add(ev["id"])
                    if ev.get("type") != "metrics":
                        style = {"error": "red", "warn": "yellow"}.get(ev.get("level", "info"), "dim")
                        bar.console.print(f"[{style}]{_ts(ev.get('created_at'))}[/]  {ev.get('message', '')}",
                                          highlight=False)
                p = _progress(job)
                loss = p.get("loss")
                phase = _phase(p) if job["status"] == "running" else ""
                if phase and phase.split()[0] != shown_phase:  # a line when the phase changes
                    shown_phase = phase.split()[0]
                    bar.console.print(f"phase: {phase}", highlight=False)
                bar.update(task, description=f"{job_id} {job['status']}" + (f" ({phase})" if phase else ""),
                           completed=p.get("step") or 0, total=p.get("total_steps") or None,
                           loss=f"{loss:.4f}" if isinstance(loss, (int, float)) else "-",
                           eta=_fmt_eta(p.get("eta_seconds")))
                if job["status"] in FINAL_STATUSES:
                    if job["status"] == "succeeded" and p.get("total_steps"):
                        bar.update(task, completed=p["total_steps"], eta="done")
                    return job
                time.sleep(interval)

    try:
        job = _run_client(run)
    except KeyboardInterrupt:
        console.print(f"\nstopped following; the job goes on. Cancel it with: tuneserve jobs cancel {job_id}")
        raise typer.Exit(130)
    _print_final(job)
    raise typer.Exit(0 if job["status"] == "succeeded" else 1)


def _phase(p: dict[str, Any]) -> str:
    """`training`, `evaluating 12/100` or `publishing` (the domain's JobProgress.phase_text)."""
    from pydantic import ValidationError

    from service.core.domain import JobProgress
    try:
        return JobProgress.model_validate(p).phase_text or ""
    except ValidationError:  # a newer server's shape: show what it says
        return str(p.get("phase") or "")


def _print_final(job: dict[str, Any]) -> None:
    lines = [f"status: {_status(job['status'])}"]
    if job.get("fine_tuned_model"):
        lines.append(f"fine_tuned_model: [bold]{job['fine_tuned_model']}[/]")
    if job.get("trained_tokens"):
        lines.append(f"trained_tokens: {job['trained_tokens']}")
    if job.get("error"):
        err = job["error"]
        lines.append(f"[red]error[/]: {err.get('code')}: {err.get('message')}")
    metrics = (job.get("result") or {}).get("metrics") if isinstance(job.get("result"), dict) else None
    metrics = metrics if isinstance(metrics, dict) else {}
    losses = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if losses:
        lines.append("metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in losses.items()))
    quality = _quality_lines(metrics.get("quality"))
    if quality:
        lines += quality + [f"before/after samples: tuneserve jobs samples {job['id']}"]
    if job["status"] == "succeeded" and job.get("fine_tuned_model"):
        lines.append(f"chat with it: tuneserve chat --adapter {job['fine_tuned_model']}")
    console.print(Panel("\n".join(lines), title=job["id"], expand=False))


def _quality_lines(quality: Any) -> list[str]:
    """BLEU/ROUGE of base vs adapter, one line per metric (the samples are not printed)."""
    if not isinstance(quality, dict) or not isinstance(quality.get("adapter"), dict):
        return [f"quality: {quality['error']}"] if isinstance(quality, dict) and quality.get("error") else []
    base, tuned = quality.get("base") or {}, quality["adapter"]
    out = [f"quality on {quality.get('n_samples')} {quality.get('split', '')} prompts (base -> adapter):"]
    for key, value in tuned.items():
        if isinstance(value, (int, float)) and key != "n_samples":
            before = base.get(key)
            diff = f" ({value - before:+.2f})" if isinstance(before, (int, float)) else ""
            out.append(f"  {key}: {before if before is not None else '-'} -> {value}{diff}")
    return out


@jobs_app.command("samples")
def jobs_samples(ctx: typer.Context, job_id: str,
                 limit: Annotated[int, typer.Option(min=1, help="Rows to show.")] = 10,
                 as_json: Annotated[bool, typer.Option("--json", help="Raw JSON.")] = False,
                 url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None):
    """The evaluation's before/after rows: prompt, reference, base reply, adapter reply."""
    def run():
        with _client(ctx, url, api_key) as c:
            return c.get(f"/v1/fine_tuning/jobs/{job_id}/samples", limit=limit)

    page = _run_client(run)
    if as_json:
        console.print_json(data=page)
        return
    table = Table("prompt", "reference", "base", "adapter", show_lines=True)
    for row in page.get("data", []):
        table.add_row(*(str(row.get(k, "")) for k in ("prompt", "reference", "base", "adapter")))
    _print_table(table)
    console.print(f"{len(page.get('data', []))} of {page.get('n_samples', 0)} rows"
                  + (f"; more: --limit {page['n_samples']}" if page.get("has_more") else ""))


# ---------------------------------------------------------------------------------------
# adapters
# ---------------------------------------------------------------------------------------
@adapters_app.command("list")
def adapters_list(ctx: typer.Context,
                  as_json: Annotated[bool, typer.Option("--json", help="Raw JSON.")] = False,
                  url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None):
    """This tenant's adapters (GET /v1/adapters)."""
    def run():
        with _client(ctx, url, api_key) as c:
            return c.get("/v1/adapters")

    page = _run_client(run)
    if as_json:
        console.print_json(data=page)
        return
    table = Table("name", "version", "base_model", "r", "job", "created")
    for a in page.get("data", []):
        manifest = a.get("manifest") if isinstance(a.get("manifest"), dict) else a
        table.add_row(str(a.get("name") or a.get("id")), str(manifest.get("version", "-")),
                      str(manifest.get("base_model", "-")), str(manifest.get("r", "-")),
                      str(manifest.get("job_id") or "-"), _ts(a.get("created_at") or manifest.get("created_at")))
    _print_table(table)


@adapters_app.command("export")
def adapters_export(ctx: typer.Context, name: str,
                    out: Annotated[Path, typer.Option("--out", help="Output directory (new or empty).")],
                    fmt: Annotated[str, typer.Option("--format", help="chatglm3 (peft on the original "
                                                     "ChatGLM3-6B) or peft (the registry's own pair).")] = "chatglm3",
                    version: Annotated[Optional[int], typer.Option(help="Version (default: latest).")] = None,
                    local: Annotated[bool, typer.Option("--local", help="Operator mode: read the registry "
                                                        "under TUNESERVE_DATA_DIR directly, no server.")] = False,
                    tenant: Annotated[str, typer.Option(help="Owner tenant (--local only).")] = "default",
                    url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None):
    """Export an adapter: downloaded from the API (GET /v1/adapters/NAME/export), or --local."""
    if fmt not in ("chatglm3", "peft"):
        raise _fail(f"unknown --format {fmt!r} (supported: chatglm3, peft)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise _fail(f"--out {out} exists and is not an empty directory")
    if local:
        _export_local(name, out, fmt, tenant, version)
        return

    def run() -> None:
        with _client(ctx, url, api_key) as c:
            params = {"format": fmt, "archive": "tar", "version": version}
            blob = c.download(f"/v1/adapters/{name}/export", {k: v for k, v in params.items() if v is not None})
        _extract_tar(blob, out)

    _run_client(run)
    files = sorted(p.name for p in out.iterdir())
    console.print(f"[green]exported[/] {name} ({fmt}) -> {out}: {', '.join(files)}")


def _extract_tar(blob: bytes, out: Path) -> None:
    """The archive holds one top directory; its files land directly in `out`. Members are
    filtered (no absolute paths, links or `..`) since the bytes came over the network."""
    import io
    import shutil
    import tarfile
    import tempfile
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".export-") as tmp:
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tf:
            tf.extractall(tmp, filter="data")
        entries = list(Path(tmp).iterdir())
        src = entries[0] if len(entries) == 1 and entries[0].is_dir() else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        for item in src.iterdir():
            shutil.move(str(item), out / item.name)


def _export_local(name: str, out: Path, fmt: str, tenant: str, version: int | None) -> None:
    from service.core.errors import TuneserveError
    from service.core.export import check_export_format, export_adapter
    from service.core.registry import AdapterRegistry
    try:
        registry = AdapterRegistry(_settings().resolved_registry_dir)
        adapter_dir, manifest = registry.resolve(tenant, name, version)
        check_export_format(fmt, manifest)
        registry.verify(adapter_dir, manifest)  # the files match the manifest's sha256
        export_adapter(Path(adapter_dir), manifest, fmt, out)
    except TuneserveError as exc:
        raise _fail(exc.message)
    console.print(f"[green]exported[/] {tenant}/{name} v{manifest.version} ({fmt}) -> {out}")


# ---------------------------------------------------------------------------------------
# chat
# ---------------------------------------------------------------------------------------
@app.command()
def chat(ctx: typer.Context,
         adapter: Annotated[Optional[str], typer.Option(help="Adapter (a job's fine_tuned_model); default: base.")] = None,
         message: Annotated[Optional[str], typer.Option("--message", "-m", help="One message; no REPL.")] = None,
         system: Annotated[Optional[str], typer.Option(help="System prompt.")] = None,
         temperature: Annotated[float, typer.Option(min=0, max=2)] = 0.8,
         top_p: Annotated[float, typer.Option(min=0.01, max=1)] = 0.8,
         max_tokens: Annotated[Optional[int], typer.Option(
             min=1, help="Reply length cap; default: the server's (clipped to the context).")] = None,
         stream: Annotated[bool, typer.Option(help="Stream tokens as they come.")] = True,
         url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None):
    """Chat with the base model or an adapter: one --message, or an interactive REPL (/reset, /exit)."""
    def run() -> None:
        with _client(ctx, url, api_key) as c:
            model = adapter or c.default_base_model()
            history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []

            def ask(text: str) -> str:
                body = {"model": model, "messages": history + [{"role": "user", "content": text}],
                        "temperature": temperature, "top_p": top_p, "stream": stream}
                if max_tokens is not None:  # an explicit cap must fit the context (else a 400)
                    body["max_tokens"] = max_tokens
                if not stream:
                    reply = c.post("/v1/chat/completions", body)["choices"][0]["message"]["content"] or ""
                    console.print(reply, highlight=False, markup=False)
                    return reply
                parts: list[str] = []
                for chunk in c.stream_sse("/v1/chat/completions", body):
                    for choice in chunk.get("choices", []):
                        piece = (choice.get("delta") or {}).get("content") or ""
                        if piece:
                            parts.append(piece)
                            console.print(piece, end="", highlight=False, markup=False, soft_wrap=True)
                console.print()
                return "".join(parts)

            if message is not None:
                ask(message)
                return
            console.print(f"chatting with [bold]{model}[/] at {url}; /reset clears history, /exit or Ctrl-D quits")
            while True:
                try:
                    text = console.input("[bold cyan]you>[/] ").strip()
                except EOFError:
                    console.print()
                    return
                if not text:
                    continue
                if text in ("/exit", "/quit"):
                    return
                if text == "/reset":
                    del history[1 if system else 0:]
                    console.print("[dim]history cleared[/]")
                    continue
                console.print("[bold magenta]bot>[/] ", end="")
                reply = ask(text)
                history.extend([{"role": "user", "content": text}, {"role": "assistant", "content": reply}])

    try:
        _run_client(run)
    except KeyboardInterrupt:
        console.print()
        raise typer.Exit(130)


# ---------------------------------------------------------------------------------------
# keys (operator)
# ---------------------------------------------------------------------------------------
def _store():
    from service.core.store import Store
    settings = _settings()
    return Store(settings.resolved_database_url)


@keys_app.command("create")
def keys_create(tenant: Annotated[str, typer.Option(help="Tenant the key acts for.")],
                name: Annotated[Optional[str], typer.Option(help="A label for the key.")] = None):
    """Create a key; its plaintext is printed once (only its hash is stored)."""
    from service.core.domain import TENANT_PATTERN, check_name
    from service.core.errors import TuneserveError
    try:
        check_name(tenant, param="tenant", pattern=TENANT_PATTERN)
        store = _store()
        try:
            plaintext, info = store.create_api_key(tenant, name=name)
        finally:
            store.close()
    except TuneserveError as exc:
        raise _fail(exc.message)
    console.print(f"created key [bold]{info.id}[/] for tenant [bold]{info.tenant}[/]"
                  + (f" ({info.name})" if info.name else ""))
    console.print("the key (shown once, store it now):")
    print(plaintext)  # plain stdout, so `tuneserve keys create ... | tail -1` captures it


@keys_app.command("list")
def keys_list(tenant: Annotated[Optional[str], typer.Option(help="Only this tenant's keys.")] = None):
    """List keys (id, tenant, name, prefix, created, revoked); never the keys themselves."""
    store = _store()
    try:
        keys = store.list_api_keys(tenant)
    finally:
        store.close()
    table = Table(Column("id", no_wrap=True, min_width=28), "tenant", "name", "prefix",
                  Column("created", no_wrap=True), Column("revoked", no_wrap=True))
    for k in keys:
        table.add_row(k.id, k.tenant, k.name or "-", k.prefix + "…",
                      k.created_at.astimezone().strftime("%Y-%m-%d %H:%M"),
                      k.revoked_at.astimezone().strftime("%Y-%m-%d %H:%M") if k.revoked_at else "-")
    _print_table(table)


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="The key's id (key-...), from `keys list`.")]):
    """Revoke a key: requests with it answer 401 from then on."""
    from service.core.errors import TuneserveError
    store = _store()
    try:
        info = store.revoke_api_key(key_id)
    except TuneserveError as exc:
        raise _fail(exc.message)
    finally:
        store.close()
    console.print(f"revoked {info.id} (tenant {info.tenant})")


def main() -> None:  # `python -m service.cli`
    # Default SIGPIPE so `tuneserve keys list | head` ends quietly.
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    app()


if __name__ == "__main__":
    main()
