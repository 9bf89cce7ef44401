"""The dashboard in headless Chromium (Debian's /usr/bin/chromium driven by Playwright).

The real app (create_app) runs under uvicorn on a free port in a thread; jobs and events are
seeded straight into its store, so the loss curve needs no training. The playground test
runs the inference engine on the tiny ChatGLM3 fixture and holds its decode thread mid-reply
(harness.DecodeGate): the page must already show part of the reply while the engine has not
produced the rest, whatever the machine's speed.
"""
from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")
uvicorn = pytest.importorskip("uvicorn")

from service.api.app import create_app  # noqa: E402
from service.core.config import Settings  # noqa: E402
from service.core.domain import JobError, JobProgress, JobStatus, TrainingSpec  # noqa: E402
from service.core.registry import AdapterRegistry  # noqa: E402
from service.core.store import Store  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
FIXTURE_MODEL = REPO / "api_tests" / "fixtures" / "chatglm3-tiny"
OUTPUT = REPO / "test-output"
KEY, TENANT = "dash-key-0123456789abcdef", "dash"
OTHER_KEY, OTHER_TENANT = "dash-other-key-0123456789", "other"
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# The machine is small and noisy: generous waits, but every wait has a bound.
WAIT_MS = 20_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """uvicorn in a thread, so the test process can seed the same SQLite file directly."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.port = _free_port()
        self.app = create_app(settings)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "_Server":
        self.thread.start()
        deadline = time.monotonic() + 120  # the engine loads the tiny model in the lifespan
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("uvicorn exited during startup (see the log above)")
            if time.monotonic() > deadline:
                raise TimeoutError("uvicorn did not start in 120 s")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def _settings(data_dir: Path, **overrides) -> Settings:
    values = dict(data_dir=data_dir, api_keys=f"{KEY}:{TENANT},{OTHER_KEY}:{OTHER_TENANT}",
                  engine_enabled=False, base_model=str(FIXTURE_MODEL),
                  task_queue=f"tuneserve-dashtest-{uuid.uuid4().hex[:12]}")
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app without the engine: the job pages read only the store and the registry."""
    with _Server(_settings(tmp_path_factory.mktemp("dash"))) as srv:
        yield srv


@pytest.fixture(scope="module")
def store(server):
    s = Store(server.settings.resolved_database_url)
    yield s
    s.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A fresh context per test (own localStorage) with the key already stored, as after the
    first visit; page errors fail the test."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.add_init_script(f"localStorage.setItem('tuneserve.apiKey', {json.dumps(KEY)})")
    pg = context.new_page()
    pg.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def _spec() -> TrainingSpec:
    return TrainingSpec(max_steps=130, batch_size=4, eval_steps=40, lora_r=8)


def _points(page, selector: str) -> list[tuple[float, float]]:
    raw = page.get_attribute(selector, "points") or ""
    return [tuple(map(float, p.split(","))) for p in raw.split()]


# ---------------------------------------------------------------------------------------
# Loss curve
# ---------------------------------------------------------------------------------------
def test_job_page_draws_loss_curve_for_every_step(server, store, page):
    """130 metric events (more than one page of /events) -> one polyline vertex per step,
    x increasing with the step, y falling as the loss falls; eval loss as a second curve;
    metrics and the before/after table once the job succeeded. Screenshot saved."""
    steps = list(range(1, 131))
    losses = {s: 2.5 * math.exp(-s / 40) + 0.3 + 0.05 * math.sin(s) for s in steps}
    eval_steps = [40, 80, 120]
    job = store.create_job(tenant=TENANT, model="chatglm3-tiny", spec=_spec(), suffix="curve")
    store.transition(job.id, JobStatus.running, worker_id="test-worker")
    store.add_event(job.id, "training started: 130 steps")
    for s in steps:
        store.add_event(job.id, f"step {s}", type="metrics",
                        data={"step": s, "loss": losses[s], "learning_rate": 1e-4, "tokens_per_second": 900.0})
        if s in eval_steps:
            store.add_event(job.id, f"eval at step {s}", type="metrics",
                            data={"step": s, "eval_loss": losses[s] + 0.2})
    store.update_progress(job.id, JobProgress(step=130, total_steps=130, loss=losses[130], eval_loss=losses[120] + 0.2,
                                              tokens_per_second=900.0, eta_seconds=0), trained_tokens=52_000)
    store.add_event(job.id, "published adapter ft-curve-x v1")
    store.transition(job.id, JobStatus.succeeded, fine_tuned_model="ft-curve-x", result={
        "metrics": {"bleu-4": 8.41, "rouge-1": 30.2, "rouge-2": 7.9, "rouge-l": 24.5},
        "before_after": [
            {"prompt": "类型#裙*颜色#红色", "reference": "一条红色的裙子", "before": "裙子", "after": "红色的裙子很好看"},
            {"prompt": "类型#裤*版型#宽松", "reference": "宽松的裤子", "before": "裤", "after": "宽松舒适的裤子"},
        ]})

    page.goto(f"{server.url}/#/jobs/{job.id}")
    curve = page.wait_for_selector("svg#loss-chart polyline#loss-curve")
    # All pages of events arrive before the chart is drawn.
    page.wait_for_function("document.querySelector('#loss-curve').dataset.count === '130'")

    assert page.get_attribute("#loss-curve", "data-steps") == ",".join(map(str, steps))
    pts = _points(page, "#loss-curve")
    assert len(pts) == len(steps)
    xs = [x for x, _ in pts]
    assert all(b > a for a, b in zip(xs, xs[1:])), "x must increase with the step"
    # y is one affine, decreasing map of the loss (SVG y grows downwards), to rounding.
    lo, hi = min(steps, key=losses.get), max(steps, key=losses.get)
    y_lo, y_hi = pts[lo - 1][1], pts[hi - 1][1]
    slope = (y_hi - y_lo) / (losses[hi] - losses[lo])
    assert slope < 0
    for s, (_, y) in zip(steps, pts):
        assert abs(y - (y_lo + slope * (losses[s] - losses[lo]))) < 0.05, (s, y)
    box = curve.bounding_box()
    assert box and box["width"] > 300 and box["height"] > 50, f"curve not visibly drawn: {box}"

    assert page.get_attribute("#eval-loss-curve", "data-steps") == "40,80,120"
    assert len(_points(page, "#eval-loss-curve")) == 3

    assert page.inner_text("#job-status") == "succeeded"
    assert page.get_attribute("#job-progress", "aria-valuenow") == "100"
    assert page.is_hidden("#job-cancel")
    metrics = page.inner_text("#job-metrics")
    assert "bleu-4" in metrics and "8.41" in metrics
    table = page.inner_text("#before-after")
    assert "红色的裙子很好看" in table and "宽松舒适的裤子" in table
    # 1 + 130 + 3 + 1 events, newest first
    rows = page.locator("#events-body tr")
    assert rows.count() == 135
    assert "published adapter" in rows.first.inner_text()
    assert "ft-curve-x" in page.inner_text("#job-info")

    OUTPUT.mkdir(exist_ok=True)
    shot = OUTPUT / "dashboard-job-loss-curve.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


def test_job_page_follows_a_running_job_and_cancels(server, store, page):
    """Live: status, progress bar, ETA and new loss points appear without reloading; the
    cancel button asks the API, and the page shows the request."""
    job = store.create_job(tenant=TENANT, model="chatglm3-tiny", spec=_spec())
    page.goto(f"{server.url}/#/jobs/{job.id}")
    page.wait_for_selector("#job-status [data-status=queued]")
    assert page.is_visible("#job-cancel")
    # The loss section renders from the events (their own request), after the status: wait.
    page.wait_for_selector("#loss-empty")

    store.transition(job.id, JobStatus.running, worker_id="test-worker")
    for s in (1, 2, 3):
        store.add_event(job.id, f"step {s}", type="metrics", data={"step": s, "loss": 3.0 - s * 0.5})
    store.update_progress(job.id, JobProgress(step=3, total_steps=12, loss=1.5, tokens_per_second=321.0,
                                              eta_seconds=125))
    # The page may poll between these writes: wait for the end state, not for the first change.
    page.wait_for_selector("#job-status [data-status=running]")
    page.wait_for_function("document.querySelector('#loss-curve')?.dataset.count === '3'")
    page.wait_for_selector("#job-progress[aria-valuenow='25']")
    text = page.inner_text("#job-progress-text")
    assert "step 3 / 12" in text and "ETA 2m 5s" in text

    store.add_event(job.id, "step 4", type="metrics", data={"step": 4, "loss": 1.2})
    page.wait_for_function("document.querySelector('#loss-curve')?.dataset.count === '4'")

    page.once("dialog", lambda d: d.accept())
    page.click("#job-cancel")
    page.wait_for_selector("#job-cancel[data-requested=true]")
    assert store.is_cancel_requested(job.id)
    # The worker would now stop at its next step.
    store.transition(job.id, JobStatus.cancelled)
    page.wait_for_selector("#job-status [data-status=cancelled]")
    page.wait_for_selector("#job-cancel", state="hidden")


def test_job_page_shows_failure(server, store, page):
    job = store.create_job(tenant=TENANT, model="chatglm3-tiny", spec=_spec())
    store.transition(job.id, JobStatus.running)
    store.add_event(job.id, "CUDA out of memory", level="error")
    store.transition(job.id, JobStatus.failed,
                     error=JobError(code="out_of_memory", message="needs 9.1 GiB, 8 GiB free"))
    page.goto(f"{server.url}/#/jobs/{job.id}")
    page.wait_for_selector("#job-status [data-status=failed]")
    assert "out_of_memory" in page.inner_text("#job-error")
    # The events table fills in after the status (its own request): wait for it, then count.
    page.wait_for_selector("#events-body tr.level-error")
    assert page.locator("#events-body tr.level-error").count() == 1


def test_jobs_list_refreshes_live(server, store, page):
    first = store.create_job(tenant=TENANT, model="chatglm3-tiny", spec=_spec())
    hidden = store.create_job(tenant=OTHER_TENANT, model="chatglm3-tiny", spec=_spec())
    page.goto(f"{server.url}/#/jobs")
    page.wait_for_selector(f"tr[data-job-id='{first.id}'] [data-status=queued]")
    assert page.locator(f"tr[data-job-id='{hidden.id}']").count() == 0, "another tenant's job is listed"

    # New job and a status change show up on the next poll, without a reload.
    second = store.create_job(tenant=TENANT, model="chatglm3-tiny", spec=_spec())
    store.transition(first.id, JobStatus.running)
    store.update_progress(first.id, JobProgress(step=5, total_steps=10))
    page.wait_for_selector(f"tr[data-job-id='{second.id}']")
    page.wait_for_selector(f"tr[data-job-id='{first.id}'] [data-status=running]")
    page.wait_for_selector(f"tr[data-job-id='{first.id}'] .mini-progress[title='5/10']")
    ids = page.eval_on_selector_all("#jobs-body tr", "rows => rows.map(r => r.dataset.jobId)")
    assert ids.index(second.id) < ids.index(first.id), "newest first"

    page.click(f"tr[data-job-id='{second.id}'] a")
    page.wait_for_selector("#job-id")
    assert page.inner_text("#job-id") == second.id

    page.goto(f"{server.url}/#/jobs/{hidden.id}")  # another tenant's job: the API says 404
    page.wait_for_selector("#flash:not([hidden])")
    assert "not found" in page.inner_text("#flash")


def test_adapters_page_lists_manifests_and_metrics(server, tmp_path, page):
    src = tmp_path / "adapter"
    src.mkdir()
    (src / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    (src / "adapter_model.safetensors").write_bytes(os.urandom(2048))
    registry = AdapterRegistry(server.settings.resolved_registry_dir)
    registry.publish(tenant=TENANT, name="ft-ads-demo", source_dir=src, manifest=dict(
        base_model="chatglm3-tiny", target_modules=["query_key_value"], r=8, lora_alpha=32.0,
        job_id="ftjob-000000000000000000000abc", training={"steps": 130},
        metrics={"bleu-4": 8.41, "rouge-l": 24.5}))
    registry.publish(tenant=OTHER_TENANT, name="not-mine", source_dir=src, manifest=dict(
        base_model="chatglm3-tiny", target_modules=["query_key_value"], r=4, lora_alpha=16.0))

    page.goto(f"{server.url}/#/adapters")
    row = page.wait_for_selector("tr[data-adapter='ft-ads-demo']")
    text = row.inner_text()
    assert "query_key_value" in text and "8.41" in text and "24.5" in text
    assert page.locator("tr[data-adapter='not-mine']").count() == 0
    headers = page.inner_text("#adapters-table thead")
    assert "BLEU-4" in headers.upper()
    row.query_selector("button").click()
    manifest = page.inner_text(".manifest-row pre")
    assert '"job_id": "ftjob-000000000000000000000abc"' in manifest


def test_key_is_asked_once_and_a_bad_key_asks_again(server, browser):
    context = browser.new_context()
    pg = context.new_page()
    pg.set_default_timeout(WAIT_MS)
    try:
        pg.goto(f"{server.url}/#/jobs")
        pg.wait_for_selector("#auth:not([hidden])")
        pg.fill("#api-key", "wrong-key")
        pg.click("#auth-save")
        pg.wait_for_selector("#auth:not([hidden])")  # 401 -> asked again
        assert "401" in pg.inner_text("#auth-message")
        pg.fill("#api-key", KEY)
        pg.click("#auth-save")
        pg.wait_for_selector("#jobs-table")
        pg.wait_for_selector("#auth", state="hidden")
        pg.reload()
        pg.wait_for_selector("#jobs-updated:not(:empty)")
        assert pg.is_hidden("#auth"), "the key was not kept"
        assert pg.evaluate("localStorage.getItem('tuneserve.apiKey')") == KEY
    finally:
        context.close()


# ---------------------------------------------------------------------------------------
# Chat playground (real engine on the tiny fixture)
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_server(tmp_path_factory):
    settings = _settings(tmp_path_factory.mktemp("dash-chat"), engine_enabled=True, device="cpu",
                         load_in_4bit=False, max_batch_size=4, max_seq_len=256,
                         adapter_gpu_budget_bytes=1 << 20)
    with _Server(settings) as srv:
        yield srv


@pytest.mark.slow  # ~10 s of engine start-up (torch + the tiny model) before the browser runs
def _first_delta_token(engine, prompt: str, max_tokens: int) -> tuple[int, str]:
    """(tokens the engine must produce before the reply's first text delta, whole reply) for a
    greedy request, run straight on the engine: the reply head and incomplete UTF-8 are held
    back, so the first delta may need several tokens."""
    import asyncio
    import concurrent.futures

    from service.core.domain import BASE_ADAPTER, ChatMessage, GenerationRequest, SamplingParams

    async def go():
        stream = await engine.stream(GenerationRequest(
            tenant=TENANT, adapter=BASE_ADAPTER, messages=[ChatMessage(role="user", content=prompt)],
            params=SamplingParams(max_tokens=max_tokens, temperature=0.0)))
        first, text = None, ""
        async for delta in stream:
            first = first or len(stream.token_ids)
            text += delta
        return first, text, len(stream.token_ids)
    # Its own loop in its own thread: Playwright's sync API already runs one in this thread.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first, text, total = pool.submit(asyncio.run, asyncio.wait_for(go(), 120)).result()
    assert first is not None and total > first + 2, f"the reply is too short to show streaming: {text!r}"
    return first, text


def test_playground_streams_a_reply(chat_server, page, monkeypatch):
    """Incremental streaming, independent of speed: the engine is held at the decode step
    just after the one that makes the first text delta, the page must show part of the reply
    while it is held, and the finished reply, produced only after the release, extends it."""
    import httpx

    from harness import DecodeGate

    prompt = "你好，介绍一下这条裙子"
    engine = chat_server.app.state.tuneserve.engine
    first_token, expected = _first_delta_token(engine, prompt, 48)

    ready = httpx.get(f"{chat_server.url}/readyz", timeout=10)
    assert ready.json()["checks"]["engine"] == "ready", ready.text
    models = httpx.get(f"{chat_server.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert models.status_code == 200, models.text
    base = models.json()["data"][0]["id"]

    page.goto(f"{chat_server.url}/#/chat")
    page.wait_for_selector("#chat-model[data-loaded=true]")
    assert page.input_value("#chat-model") == base
    page.fill("#chat-max-tokens", "48")
    page.fill("#chat-temperature", "0")
    # The test's own observer: every callback is a separate task in which the reply changed.
    page.evaluate("""() => {
        window.__replySnapshots = [];
        const log = document.querySelector('#chat-log');
        new MutationObserver(() => {
            const el = log.querySelector('.msg.assistant .content');
            const text = el ? el.textContent : '';
            const snaps = window.__replySnapshots;
            if (text && snaps[snaps.length - 1] !== text) snaps.push(text);
        }).observe(log, {subtree: true, childList: true, characterData: true});
    }""")
    # Held before decode step k, the engine has delivered k - 1 tokens (prefill's and steps
    # 1..k-2; step k-1's is read after step k is launched): k = first_token + 1 is the first
    # hold at which the first delta can exist, and all later tokens are still to come.
    hold_at = first_token + 1
    gate = DecodeGate(engine._runner, hold_at=hold_at)
    monkeypatch.setattr(engine._runner, "decode", gate)
    page.fill("#chat-input", prompt)
    page.click("#chat-send")
    try:
        gate.wait_held(120)
        partial = page.wait_for_function(
            "() => document.querySelector('.msg.assistant .content')?.textContent || null").json_value()
        produced_while_held = gate.calls
        still_streaming = page.get_attribute(".msg.assistant", "data-done") is None
    finally:
        gate.release()
    reply = page.wait_for_selector(".msg.assistant[data-done=true]", timeout=120_000)
    assert "failed" not in (reply.get_attribute("class") or ""), page.inner_text("#flash")
    assert not gate.hold_timed_out
    assert produced_while_held == hold_at and still_streaming, "the engine moved on before the page was checked"

    text = page.eval_on_selector(".msg.assistant .content", "e => e.textContent")
    assert text == expected, "the page's reply is not the engine's greedy reply"
    assert text.startswith(partial) and len(text) > len(partial), (partial, text)
    assert gate.calls > hold_at, "the rest of the reply came from decode steps after the release"
    assert int(reply.get_attribute("data-chunks")) > 1, f"one SSE chunk only: {text!r}"
    snapshots = page.evaluate("window.__replySnapshots")
    assert partial in snapshots and snapshots[-1] != partial, snapshots
    # each snapshot extends the previous one: token-by-token growth, never a rewrite
    assert all(b.startswith(a) for a, b in zip(snapshots, snapshots[1:]))
    assert snapshots[-1] == page.eval_on_selector(".msg.assistant .content", "e => e.textContent")
    usage = page.inner_text("#chat-usage")
    assert "completion" in usage and "finish:" in usage, usage

    OUTPUT.mkdir(exist_ok=True)
    page.screenshot(path=str(OUTPUT / "dashboard-playground.png"), full_page=True)
