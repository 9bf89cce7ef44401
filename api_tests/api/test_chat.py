"""Chat through the API on the real engine with the tiny ChatGLM3 fixture (CPU): the OpenAI
chat.completion / chunk shapes, SSE framing, stream == non-stream under greedy decoding,
adapters chosen per request and scoped to the tenant, /chat's two history shapes, 429 with
Retry-After, and a client disconnect (real uvicorn) cancelling the generation."""
from __future__ import annotations

import copy
import json
import tempfile
import threading
import uuid
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.core.config import Settings

from .conftest import AUTH_A, AUTH_B, KEY_A, KEY_B, REDIS_URL, assert_error

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "chatglm3-tiny"
TARGETS = ["q_proj", "k_proj", "v_proj"]
MSG = [{"role": "user", "content": "类型#裙*材质#蕾丝"}]

pytestmark = pytest.mark.slow  # loads the engine once (~10 s on 2 CPU cores)


@pytest.fixture(scope="module")
def engine_app(tmp_path_factory, redis_client):
    data = tmp_path_factory.mktemp("chat")
    settings = Settings(data_dir=data, redis_url=REDIS_URL, task_queue=f"tuneserve-apitest-chat-{uuid.uuid4().hex[:12]}",
                        api_keys=f"{KEY_A}:alice,{KEY_B}:bob", engine_enabled=True,
                        base_model=str(FIXTURE), load_in_4bit=False, device="cpu", max_batch_size=4,
                        max_seq_len=128, adapter_gpu_budget_bytes=1 << 20)
    app = create_app(settings)
    with TestClient(app) as client:
        assert client.get("/readyz").json()["checks"]["engine"] == "ready"
        yield app, client, settings


@pytest.fixture(scope="module")
def client(engine_app):
    return engine_app[1]


@pytest.fixture(scope="module")
def base_name(client):
    return client.get("/v1/models", headers=AUTH_A).json()["data"][0]["id"]


@pytest.fixture(scope="module")
def adapter(engine_app, base_name):
    """A random non-zero PEFT LoRA published for alice (it visibly changes greedy outputs)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from service.models import load_model
    app, client, settings = engine_app
    engine = app.state.tuneserve.engine
    base = load_model(engine.model_path, quantize_4bit=False, device="cpu")
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8.0, target_modules=TARGETS,
                                                                lora_dropout=0.0, task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.6)
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp)
        app.state.tuneserve.registry.publish(tenant="alice", name="ft-ads-test", source_dir=Path(tmp), manifest={
            "base_model": base_name, "target_modules": TARGETS, "r": 4, "lora_alpha": 8.0})
    return "ft-ads-test"


def complete(client, model, headers=AUTH_A, **kw):
    body = {"model": model, "messages": MSG, "max_tokens": 12, "temperature": 0, **kw}
    return client.post("/v1/chat/completions", headers=headers, json=body)


def sse_events(client, model, headers=AUTH_A, **kw) -> list:
    body = {"model": model, "messages": MSG, "max_tokens": 12, "temperature": 0, "stream": True, **kw}
    with client.stream("POST", "/v1/chat/completions", headers=headers, json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines), lines
    assert lines[-1] == "data: [DONE]"
    return [json.loads(ln[6:]) for ln in lines[:-1]]


def test_non_stream_shape(client, base_name):
    r = complete(client, base_name)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == base_name and isinstance(body["created"], int)
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    u = body["usage"]
    assert u["prompt_tokens"] > 0 and 0 < u["completion_tokens"] <= 12
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


def test_stream_matches_non_stream(client, base_name):
    whole = complete(client, base_name).json()
    events = sse_events(client, base_name, stream_options={"include_usage": True})
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == events[0]["id"] for e in events)
    content = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert content == whole["choices"][0]["message"]["content"]
    finish = [e for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert len(finish) == 1 and finish[0]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == whole["usage"]
    # without include_usage there is no usage chunk
    assert all("usage" not in e for e in sse_events(client, base_name))


def test_adapter_per_request_and_tenant_scoped(client, base_name, adapter):
    base_text = complete(client, base_name).json()["choices"][0]["message"]["content"]
    r = complete(client, adapter)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == adapter
    assert r.json()["choices"][0]["message"]["content"] != base_text
    ids = [m["id"] for m in client.get("/v1/models", headers=AUTH_A).json()["data"]]
    assert ids == [base_name, adapter]
    # bob: alice's adapter does not exist for him, on every chat route
    assert_error(complete(client, adapter, headers=AUTH_B), 404, param="model", code="model_not_found")
    with client.stream("POST", "/v1/chat/completions", headers=AUTH_B,
                       json={"model": adapter, "messages": MSG, "stream": True}) as r:
        assert r.status_code == 404
    assert_error(client.post("/chat", headers=AUTH_B, json={"adapter": adapter, "query": "x"}), 404,
                 param="adapter")
    assert [m["id"] for m in client.get("/v1/models", headers=AUTH_B).json()["data"]] == [base_name]
    assert_error(complete(client, "no-such-model"), 404, param="model")
    assert_error(complete(client, "../../etc/passwd"), 404, param="model")


def test_a_job_id_as_model_says_to_use_the_jobs_fine_tuned_model(client, base_name):
    """Issue 14 part 5: the 404 for a made-up job id says what a job id is for (the hint text
    for real jobs is tested in test_jobs.py against the store)."""
    r = complete(client, "ftjob-000000000000000000000000")
    assert_error(r, 404, param="model", code="model_not_found")
    assert "chat with the job's fine_tuned_model instead" in r.json()["error"]["message"]
    assert "fine_tuned_model" not in complete(client, "no-such-model").json()["error"]["message"]


def test_simple_chat_both_history_shapes(client, base_name, adapter):
    r = client.post("/chat", headers=AUTH_A, json={"query": "你好", "history": [["hi", "hello"]],
                                                    "max_new_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["history"] == [["hi", "hello"], ["你好", body["response"]]]
    assert body["usage"]["completion_tokens"] > 0 and body["model"] == base_name
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    r2 = client.post("/chat", headers=AUTH_A, json={"query": "你好", "history": msgs, "adapter": "",
                                                     "max_new_tokens": 8, "temperature": 0}).json()
    assert r2["history"] == msgs + [{"role": "user", "content": "你好"},
                                    {"role": "assistant", "content": r2["response"]}]
    assert r2["response"] == body["response"]  # same conversation, greedy: same answer
    r3 = client.post("/chat", headers=AUTH_A, json={"query": "你好", "adapter": adapter,
                                                     "max_new_tokens": 8, "temperature": 0}).json()
    assert r3["model"] == adapter
    assert_error(client.post("/chat", headers=AUTH_A, json={"query": "x", "history": [["only one"]]}), 400)
    assert_error(client.post("/chat", headers=AUTH_A, json={"query": "x", "max_new_tokens": 0}), 400,
                 param="max_new_tokens")


def test_prompt_too_long_is_400(client, base_name):
    r = client.post("/v1/chat/completions", headers=AUTH_A,
                    json={"model": base_name, "messages": [{"role": "user", "content": "字" * 2000}]})
    assert_error(r, 400, param="messages")


def test_max_tokens_beyond_context_is_400_and_default_is_clamped(client, base_name):
    # The fixture's context is 128 tokens; the prompt is about 15.
    r = complete(client, base_name, max_tokens=120)
    assert_error(r, 400, param="max_tokens")
    assert r.json()["error"]["code"] == "context_length_exceeded"
    r = client.post("/chat", headers=AUTH_A, json={"adapter": base_name, "query": "你好", "max_new_tokens": 500})
    assert_error(r, 400, param="max_new_tokens")
    # Without max_tokens the default (256) is clamped to what fits: an answer, not an error.
    r = client.post("/v1/chat/completions", headers=AUTH_A,
                    json={"model": base_name, "messages": MSG, "temperature": 0})
    assert r.status_code == 200, r.text


def test_queue_full_is_429_with_retry_after(engine_app, base_name):
    app, client, _ = engine_app
    engine = app.state.tuneserve.engine
    saved = engine.settings
    engine.settings = saved.model_copy(update={"max_queue": 0})
    try:
        r = complete(client, base_name)
        assert_error(r, 429, code="queue_full")
        assert int(r.headers["retry-after"]) >= 1
        with client.stream("POST", "/v1/chat/completions", headers=AUTH_A,
                           json={"model": base_name, "messages": MSG, "stream": True}) as r:
            assert r.status_code == 429 and "retry-after" in r.headers
    finally:
        engine.settings = saved


def test_client_disconnect_cancels_generation(engine_app, base_name, monkeypatch):
    """Real HTTP (uvicorn): open a long stream, hang up, and the engine must finish the
    request as cancelled and free its slot. The engine is held before its first decode step
    until the server has marked the request cancelled, so it cannot finish the reply first on
    a fast machine; and the client hangs up only once the engine holds the request there (it
    is running), so a hang-up that reaches the server before the decode thread has admitted
    the request (a loaded machine) cannot cancel it while it still waits, never to decode."""
    import uvicorn

    from harness import DecodeGate, free_port, wait_for

    app, _, _ = engine_app
    engine = app.state.tuneserve.engine
    port = free_port()
    # The app's lifespan already ran under the TestClient; serve the same app without a second one.
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    gate = DecodeGate(engine._runner, hold_at=1)
    try:
        wait_for(lambda: server.started or not t.is_alive(), 60, "uvicorn to start")
        assert server.started, "uvicorn exited during startup"
        # Requests an earlier test ended (a stop string cancels) are counted before we start,
        # and none of them can be the one the gate holds.
        wait_for(lambda: engine.stats()["running"] == 0 and engine.stats()["queue_depth"] == 0, 60, "the engine idle")
        monkeypatch.setattr(engine._runner, "decode", gate)
        before = engine.stats()["counters"].get("finish_cancelled", 0)
        body = {"model": base_name, "messages": MSG, "max_tokens": 100, "temperature": 0, "stream": True,
                "stop": ["\x00never"]}
        with httpx.Client(timeout=30) as http:
            with http.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", headers=AUTH_A,
                             json=body) as r:
                assert r.status_code == 200
                # Kept in a name: a partly read line iterator that is dropped closes the
                # connection, which would hang up here, before the engine has the request.
                lines = r.iter_lines()
                # The role chunk comes before any token.
                assert next(line for line in lines if line.startswith("data: {"))
                gate.wait_held(60)  # prefilled and running, parked before its first decode step
                assert engine.stats()["running"] == 1
            # Leaving the block closes the half-read response: the client hangs up.
        wait_for(lambda: any(req.cancelled for req in list(engine._running.values())), 60,
                 "the server to cancel the request of the client that hung up")
        gate.release()
        wait_for(lambda: engine.stats()["running"] == 0, 60, "the slot to be freed")
        st = engine.stats()
        assert st["counters"].get("finish_cancelled", 0) == before + 1, st["counters"]
        assert not gate.hold_timed_out
    finally:
        gate.release()
        server.should_exit = True
        t.join(10)


def test_chat_metrics_recorded(client, base_name):
    # Its own requests (a plain one and a stream): the metrics must not rely on other tests
    # of this module having chatted first.
    body = {"model": base_name, "messages": MSG, "max_tokens": 4, "temperature": 0}
    assert client.post("/v1/chat/completions", headers=AUTH_A, json=body).status_code == 200
    with client.stream("POST", "/v1/chat/completions", headers=AUTH_A, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        r.read()
    text = client.get("/metrics").text
    assert 'tuneserve_chat_request_duration_seconds_count{kind="base",stream="false"}' in text
    assert 'tuneserve_chat_time_to_first_token_seconds_count{kind="base"}' in text
    assert "tuneserve_adapter_loads_total" in text and "tuneserve_engine_ready 1.0" in text


def test_chat_through_the_openai_sdk(client, base_name, adapter):
    import openai
    from openai import OpenAI
    oa = OpenAI(api_key=KEY_A, base_url=str(client.base_url) + "/v1", http_client=client, max_retries=0)
    whole = oa.chat.completions.create(model=adapter, messages=MSG, max_tokens=10, temperature=0)
    assert whole.choices[0].message.role == "assistant" and whole.usage.completion_tokens > 0
    chunks = list(oa.chat.completions.create(model=adapter, messages=MSG, max_tokens=10, temperature=0,
                                             stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert [m.id for m in oa.models.list()] == [base_name, adapter]
    with pytest.raises(openai.NotFoundError):
        OpenAI(api_key=KEY_B, base_url=str(client.base_url) + "/v1", http_client=client,
               max_retries=0).chat.completions.create(model=adapter, messages=MSG)


def test_export_chatglm3_layout(client, adapter):
    import io
    import tarfile
    import zipfile
    r = client.get(f"/v1/adapters/{adapter}/export", headers=AUTH_A, params={"format": "chatglm3"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/zip"
    zf = zipfile.ZipFile(io.BytesIO(r.content))
    names = {n.split("/", 1)[1] for n in zf.namelist()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names
    cfg = json.loads(zf.read(next(n for n in zf.namelist() if n.endswith("adapter_config.json"))))
    assert "query_key_value" in json.dumps(cfg["target_modules"])
    assert cfg["base_model_name_or_path"] == "chatglm3-tiny"  # the manifest's base, not a fixed hub id
    r = client.get(f"/v1/adapters/{adapter}/export", headers=AUTH_A, params={"format": "chatglm3", "archive": "tar"})
    assert r.status_code == 200
    members = [m.name for m in tarfile.open(fileobj=io.BytesIO(r.content))]
    assert all(m.startswith(f"{adapter}-v1-chatglm3") for m in members)
    assert_error(client.get(f"/v1/adapters/{adapter}/export", headers=AUTH_B), 404)


def test_export_chatglm3_refused_for_another_family(engine_app, client, adapter, base_name):
    """The ChatGLM3 key mapping would also take a Llama adapter's q/k/v names; the manifest's
    family decides, before any file is read or written."""
    app, _client, _settings = engine_app
    registry = app.state.tuneserve.registry
    src, _ = registry.resolve("alice", adapter)
    registry.publish(tenant="alice", name="ft-llama-like", source_dir=Path(src), manifest={
        "base_model": "meta-llama/Llama-3.2-1B", "model_family": "llama", "target_modules": TARGETS,
        "r": 4, "lora_alpha": 8.0})
    try:  # the module shares one registry: leave nothing behind for the other tests
        err = assert_error(client.get("/v1/adapters/ft-llama-like/export", headers=AUTH_A,
                                      params={"format": "chatglm3"}), 400, param="format", code="unsupported_format")
        assert "chatglm3" in err["message"] and "llama" in err["message"]
        r = client.get("/v1/adapters/ft-llama-like/export", headers=AUTH_A, params={"format": "peft"})
        assert r.status_code == 200
    finally:
        registry.delete("alice", "ft-llama-like")


def test_one_registry_read_per_request(engine_app, client, adapter, monkeypatch):
    """ServingChat looks the adapter's version up once and hands it to the engine, which does
    not look again (the manifest itself is read only on a cache miss, by the engine's loader)."""
    registry = engine_app[0].state.tuneserve.registry
    assert complete(client, adapter).status_code == 200  # resident from here on
    reads = []
    for name in ("latest_version", "resolve", "list_versions"):
        real = getattr(registry, name)
        monkeypatch.setattr(registry, name, lambda *a, _real=real, _name=name, **k: reads.append(_name) or _real(*a, **k))
    assert complete(client, adapter).status_code == 200
    assert reads == ["latest_version"]
    reads.clear()
    sse_events(client, adapter)
    assert reads == ["latest_version"]


def test_chat_errors_counted_once(engine_app, base_name):
    """A refused chat request (here: queue full) counts once in tuneserve_chat_errors, streamed
    or not, on either chat route."""
    app, client, _ = engine_app
    state = app.state.tuneserve
    engine = state.engine
    counter = state.metrics.chat_errors.labels("queue_full")
    saved = engine.settings
    engine.settings = saved.model_copy(update={"max_queue": 0})
    try:
        before = counter._value.get()
        assert complete(client, base_name).status_code == 429
        with client.stream("POST", "/v1/chat/completions", headers=AUTH_A,
                           json={"model": base_name, "messages": MSG, "stream": True}) as r:
            assert r.status_code == 429
        assert client.post("/chat", headers=AUTH_A, json={"query": "x"}).status_code == 429
        assert counter._value.get() == before + 3
    finally:
        engine.settings = saved
