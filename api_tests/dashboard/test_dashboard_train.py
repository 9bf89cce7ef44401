"""The dashboard that trains, in headless Chromium: first visit asks for a key, upload (drop
or pick) with the row errors shown, start a job with the common hyperparameters, the quality
table with the samples collapsed, export, webhooks, and the whole flow (upload -> create ->
loss curve -> chat with the new adapter) through the page, with the worker's own run_job
training on the tiny ChatGLM3 fixture. Screenshots under test-output/."""
from __future__ import annotations

import io
import json
import threading
import zipfile

import pytest

from .test_dashboard import (  # noqa: F401  (fixtures)
    BROWSER_ARGS, CHROMIUM, KEY, OUTPUT, TENANT, WAIT_MS, _Server, _settings, browser, page, server, store, sync_api,
)
from service.core.domain import JobProgress, JobStatus, TrainingSpec
from service.core.registry import AdapterRegistry

SAMPLE = OUTPUT.parent / "service" / "data" / "advertisegen_sample.jsonl"


def _shot(page, name: str) -> None:
    OUTPUT.mkdir(exist_ok=True)
    page.screenshot(path=str(OUTPUT / name), full_page=True)


@pytest.fixture
def redis_queue(server):
    """Jobs created through the page are enqueued on the machine's Redis under this server's
    own queue name; removed afterwards."""
    redis = pytest.importorskip("redis")
    r = redis.Redis.from_url(server.settings.redis_url, socket_connect_timeout=1)
    try:
        r.ping()
    except Exception:
        pytest.skip("Redis at 127.0.0.1:6379 is needed to create jobs")
    yield r
    r.delete(server.settings.task_queue)
    r.close()


def test_first_visit_asks_for_a_key_and_sends_nothing_before(server, browser):
    context = browser.new_context()
    pg = context.new_page()
    pg.set_default_timeout(WAIT_MS)
    requests: list[str] = []
    pg.on("request", lambda r: requests.append(r.url) if "/v1/" in r.url else None)
    try:
        pg.goto(f"{server.url}/#/jobs")
        pg.wait_for_selector("#auth:not([hidden])")
        assert pg.is_visible("#needs-key")
        assert "401" not in pg.inner_text("#auth-message") and "refused" not in pg.inner_text("#auth-message")
        assert requests == [], requests
        pg.fill("#api-key", KEY)
        pg.click("#auth-save")
        pg.wait_for_selector("#jobs-table")
    finally:
        context.close()


def _drop(page, selector: str, name: str, data: bytes) -> None:
    """A real drop event with a DataTransfer holding one file (what a drag from the desktop does)."""
    page.evaluate("""([sel, name, bytes]) => {
        const dt = new DataTransfer();
        dt.items.add(new File([new Uint8Array(bytes)], name, {type: 'application/jsonl'}));
        document.querySelector(sel).dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
    }""", [selector, name, list(data)])


def test_upload_shows_row_errors_and_a_job_starts_with_the_form(server, store, page, redis_queue):
    page.goto(f"{server.url}/#/new")
    page.wait_for_selector("#job-model[data-loaded=true]")
    assert page.is_disabled("#job-create")
    bad = (json.dumps({"content": "类型#裙", "summary": "一条裙子"}, ensure_ascii=False) + "\n"
           + json.dumps({"content": "类型#裤"}, ensure_ascii=False) + "\n").encode()
    _drop(page, "#drop-training", "bad.jsonl", bad)
    err = page.wait_for_selector("#upload-training-status.error")
    text = err.inner_text()
    assert "line 2" in text and "summary" in text, text
    assert page.is_disabled("#job-create")
    _shot(page, "dashboard-upload-error.png")

    page.set_input_files("#drop-training-input", str(SAMPLE))
    ok = page.wait_for_selector("#upload-training-status.ok")
    assert "300 rows" in ok.inner_text()
    assert page.input_value("#hp-n_epochs") == "3" and page.input_value("#hp-lora_r") == "8"  # the defaults
    page.fill("#job-suffix", "dash")
    page.fill("#hp-max_steps", "7")
    page.fill("#hp-lora_r", "4")
    page.click("#job-create")
    page.wait_for_selector("#job-id")
    job_id = page.inner_text("#job-id")
    job = store.get_job(job_id, TENANT)
    assert job.suffix == "dash" and job.spec.max_steps == 7 and job.spec.lora_r == 4 and job.spec.n_epochs == 3
    assert store.get_file(job.training_file, TENANT).rows == 300
    assert redis_queue.llen(server.settings.task_queue) == 1

    # A refused spec shows the API's message, naming the field.
    page.goto(f"{server.url}/#/new")
    page.wait_for_selector("#job-model[data-loaded=true]")
    page.set_input_files("#drop-training-input", str(SAMPLE))
    page.wait_for_selector("#upload-training-status.ok")
    page.fill("#hp-lora_r", "0")
    page.click("#job-create")
    assert "lora_r" in page.wait_for_selector("#job-create-error:not([hidden])").inner_text()


def _quality(n: int) -> dict:
    rows = [{"prompt": f"类型#裙*颜色#{i}", "reference": f"参考 {i}" * 10, "base": f"基础 {i}" * 20,
             "adapter": f"适配器回答 {i}" * 20} for i in range(n)]
    base = {"bleu-4": 2.5, "rouge-1": 12.0, "rouge-2": 3.0, "rouge-l": 10.0, "n_samples": n}
    tuned = {"bleu-4": 8.25, "rouge-1": 30.5, "rouge-2": 9.0, "rouge-l": 9.5, "n_samples": n}
    return {"split": "validation", "n_samples": n, "base": base, "adapter": tuned, "before_after": rows}


def test_quality_is_a_small_table_and_the_samples_are_collapsed(server, store, page):
    job = store.create_job(tenant=TENANT, model="chatglm3-tiny", spec=TrainingSpec(max_steps=4))
    store.transition(job.id, JobStatus.running, worker_id="w")
    store.transition(job.id, JobStatus.succeeded, fine_tuned_model="ft-quality-x",
                     result={"metrics": {"train_loss": 1.25, "eval_loss": 1.5, "quality": _quality(40)}})
    page.goto(f"{server.url}/#/jobs/{job.id}")
    table = page.wait_for_selector("#quality-table")
    rows = page.eval_on_selector_all("#quality-table tbody tr", "rs => rs.map(r => [...r.cells].map(c => c.textContent))")
    assert rows == [["BLEU-4", "2.5", "8.25", "+5.75"], ["ROUGE-1", "12", "30.5", "+18.50"],
                    ["ROUGE-2", "3", "9", "+6.00"], ["ROUGE-L", "10", "9.5", "-0.50"]]
    assert table.bounding_box()["width"] < 800
    assert "1.25" in page.inner_text("#job-metrics") and "quality" not in page.inner_text("#job-metrics")
    assert page.get_attribute("#job-samples", "open") is None  # collapsed
    height = page.evaluate("document.documentElement.scrollHeight")
    print(f"job page height with 40 samples collapsed: {height} px")
    assert height < 2500, f"the job page is {height} px tall"
    _shot(page, "dashboard-quality.png")
    page.click("#job-samples summary")
    page.wait_for_function("document.querySelectorAll('#before-after tbody tr').length === 40")
    assert "适配器回答 39" in page.inner_text("#before-after")


def test_running_job_shows_its_phase(server, store, page):
    job = store.create_job(tenant=TENANT, model="chatglm3-tiny", spec=TrainingSpec(max_steps=4))
    store.transition(job.id, JobStatus.running, worker_id="w")
    store.update_progress(job.id, JobProgress(step=4, total_steps=4, loss=1.0, eval_loss=1.5, phase="evaluating",
                                              eval_done=12, eval_total=100, eta_seconds=90))
    page.goto(f"{server.url}/#/jobs/{job.id}")
    page.wait_for_selector("#job-progress-text[data-phase=evaluating]")
    text = page.inner_text("#job-progress-text")
    assert "evaluating 12/100" in text and "eval loss 1.5" in text and "ETA 1m 30s" in text


def test_adapters_export_both_formats_and_show_the_base_public_id(server, tmp_path, page):
    src = tmp_path / "adapter"
    src.mkdir()
    (src / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 32, "peft_type": "LORA",
                                                         "target_modules": ["query_key_value"]}))
    from safetensors.torch import save_file
    import torch
    save_file({"base_model.model.transformer.encoder.layers.0.self_attention.query_key_value.lora_A.weight":
               torch.zeros(8, 16)}, str(src / "adapter_model.safetensors"))
    base_dir = tmp_path / "hosts" / "chatglm3-6b-local"
    base_dir.mkdir(parents=True)
    AdapterRegistry(server.settings.resolved_registry_dir).publish(
        tenant=TENANT, name="ft-export-me", source_dir=src, manifest=dict(
            base_model=str(base_dir), target_modules=["query_key_value"], r=8, lora_alpha=32.0,
            model_family="chatglm3", metrics={"quality": _quality(3)}))
    page.goto(f"{server.url}/#/adapters")
    row = page.wait_for_selector("tr[data-adapter='ft-export-me']")
    text = row.inner_text()
    assert "chatglm3-6b-local" in text and str(base_dir) not in text
    assert "2.5 → 8.25" in text
    names = _export(page, "ft-export-me", "peft", version=1)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {n.split("/", 1)[1] for n in names}
    assert page.is_visible("tr[data-adapter='ft-export-me'] button[data-export=chatglm3]")  # exported in the flow test


def _export(page, name: str, fmt: str, version: int) -> list[str]:
    """Click the export button and read the zip the browser saved."""
    try:
        with page.expect_download() as info:
            page.click(f"tr[data-adapter='{name}'] button[data-export={fmt}]")
    except Exception:
        raise AssertionError(f"no download of {fmt}: {page.inner_text('#flash')!r}") from None
    download = info.value
    assert download.suggested_filename == f"{name}-v{version}-{fmt}.zip"
    return zipfile.ZipFile(io.BytesIO(open(download.path(), "rb").read())).namelist()


def test_webhooks_page_adds_shows_the_secret_once_and_deletes(server, page):
    page.goto(f"{server.url}/#/webhooks")
    page.wait_for_selector("#webhooks-list .empty")
    page.fill("#webhook-name", "ci")
    page.fill("#webhook-url", "http://127.0.0.1:9/hooks/tuneserve")
    page.uncheck("input[data-event='fine_tuning.job.failed']")
    page.click("#webhook-create")
    secret = page.wait_for_selector("#webhook-secret-value").inner_text()
    assert secret.startswith("whsec_")
    row = page.wait_for_selector("#webhooks-table tr[data-webhook]")
    text = row.inner_text()
    assert "ci" in text and "fine_tuning.job.succeeded" in text and "fine_tuning.job.failed" not in text
    assert secret not in page.inner_text("#webhooks-table")  # only its hint is listed
    _shot(page, "dashboard-webhooks.png")
    page.once("dialog", lambda d: d.accept())
    row.query_selector("button.danger-text").click()
    page.wait_for_selector("#webhooks-list .empty")


# ---------------------------------------------------------------------------------------
# The whole flow through the page, with the worker's code training for real
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def train_server(tmp_path_factory):
    settings = _settings(tmp_path_factory.mktemp("dash-train"), engine_enabled=True, device="cpu",
                         load_in_4bit=False, max_batch_size=4, max_seq_len=256, adapter_gpu_budget_bytes=1 << 20)
    with _Server(settings) as srv:
        yield srv


@pytest.mark.slow
def test_upload_create_watch_the_loss_curve_and_chat_with_the_adapter(train_server, page, redis_queue_train):
    from service.core.store import Store
    from workers.tasks import run_job

    srv = train_server
    page.goto(f"{srv.url}/#/new")
    page.wait_for_selector("#job-model[data-loaded=true]")
    page.set_input_files("#drop-training-input", str(SAMPLE))
    page.wait_for_selector("#upload-training-status.ok")
    page.fill("#job-suffix", "flow")
    for key, value in (("max_steps", "6"), ("batch_size", "4"), ("learning_rate", "0.02"),
                       ("eval_max_samples", "2")):
        page.fill(f"#hp-{key}", value)
    page.click("#job-create")
    page.wait_for_selector("#job-id")
    job_id = page.inner_text("#job-id")

    # The worker: the Celery task's own run_job, in a thread of this process.
    store = Store(srv.settings.resolved_database_url)
    outcome: list[str] = []
    worker = threading.Thread(target=lambda: outcome.append(run_job(store, srv.settings, job_id, "dash-worker:1")),
                              daemon=True)
    worker.start()
    try:
        page.wait_for_selector("#job-status [data-status=succeeded]", timeout=300_000)
    finally:
        worker.join(300)
        store.close()
    assert outcome == ["succeeded"]
    page.wait_for_function("document.querySelector('#loss-curve')?.dataset.count === '6'")
    page.wait_for_selector("#quality-table")
    _shot(page, "dashboard-flow-job.png")

    page.click("#job-chat-link")
    page.wait_for_selector("#chat-model[data-loaded=true]")
    adapter = page.input_value("#chat-model")
    assert adapter.startswith("ft-flow-")
    page.fill("#chat-max-tokens", "8")
    page.fill("#chat-input", "类型#裙*颜色#红色")
    page.click("#chat-send")
    reply = page.wait_for_selector(".msg.assistant[data-done=true]", timeout=120_000)
    assert "failed" not in (reply.get_attribute("class") or ""), page.inner_text("#flash")
    assert "completion" in page.inner_text("#chat-usage")
    _shot(page, "dashboard-flow-chat.png")

    # Its export for the original ChatGLM3-6B + peft, from the adapters page.
    page.goto(f"{srv.url}/#/adapters")
    page.wait_for_selector(f"tr[data-adapter='{adapter}']")
    names = _export(page, adapter, "chatglm3", version=1)
    assert any(n.endswith("adapter_model.safetensors") for n in names), names


@pytest.fixture
def redis_queue_train(train_server):
    redis = pytest.importorskip("redis")
    r = redis.Redis.from_url(train_server.settings.redis_url, socket_connect_timeout=1)
    try:
        r.ping()
    except Exception:
        pytest.skip("Redis at 127.0.0.1:6379 is needed to create jobs")
    yield r
    r.delete(train_server.settings.task_queue)
    r.close()


def test_keys_page_lists_prefixes_creates_once_and_revokes(server, page):
    page.goto(f"{server.url}/#/keys")
    page.wait_for_selector("#keys-table")
    assert "(this page)" in page.inner_text("#keys-table") and KEY not in page.inner_text("#keys-table")
    page.fill("#key-name", "ci")
    page.click("#key-create")
    key = page.wait_for_selector("#new-key-value").inner_text()
    row = page.wait_for_selector("#keys-table tr:has-text('ci')")
    assert key[:6] in row.inner_text() and key not in page.inner_text("#keys-table")
    page.once("dialog", lambda d: d.accept())
    row.query_selector("button.danger-text").click()
    page.wait_for_function("[...document.querySelectorAll('#keys-table tr')].some(r => r.textContent.includes('ci') && !r.querySelector('button'))")
