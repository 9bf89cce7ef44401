"""Auth on every route, the one error shape, health/readiness, /metrics, models and adapters
scoped to the tenant, the dashboard shell."""
from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.api.app import create_app

from .conftest import AUTH_A, AUTH_B, BASE, assert_error, upload_ok

PROTECTED = [
    ("GET", "/v1/files"), ("POST", "/v1/files"), ("GET", "/v1/files/file-x"), ("DELETE", "/v1/files/file-x"),
    ("GET", "/v1/files/file-x/content"),
    ("GET", "/v1/fine_tuning/jobs"), ("POST", "/v1/fine_tuning/jobs"), ("GET", "/v1/fine_tuning/jobs/ftjob-x"),
    ("POST", "/v1/fine_tuning/jobs/ftjob-x/cancel"), ("GET", "/v1/fine_tuning/jobs/ftjob-x/events"),
    ("GET", "/v1/fine_tuning/jobs/ftjob-x/checkpoints"),
    ("GET", "/v1/models"), ("GET", "/v1/models/x"), ("DELETE", "/v1/models/x"),
    ("POST", "/v1/chat/completions"), ("POST", "/chat"),
    ("GET", "/v1/adapters"), ("GET", "/v1/adapters/x"), ("DELETE", "/v1/adapters/x"),
    ("GET", "/v1/adapters/x/export"), ("GET", "/v1/adapters/x/versions"),
]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-key"}, {"Authorization": "Basic abc"},
                                     {"Authorization": "Bearer "}, {"Authorization": "Bearer " + "k" * 600}],
                         ids=["none", "wrong", "basic", "empty", "huge"])
def test_every_route_needs_a_valid_key(client, headers):
    for method, path in PROTECTED:
        r = client.request(method, path, headers=headers)
        err = assert_error(r, 401, code="invalid_api_key")
        assert err["type"] == "authentication_error", (method, path)
        assert r.headers.get("www-authenticate") == "Bearer"


def test_openapi_lists_every_protected_route(client):
    spec = client.get("/openapi.json").json()
    for method, path in PROTECTED:
        templ = next((p for p in spec["paths"] if _match(p, path)), None)
        assert templ is not None, path
        assert spec["paths"][templ][method.lower()].get("security"), (method, path)


def _match(template: str, path: str) -> bool:
    t, p = template.strip("/").split("/"), path.strip("/").split("/")
    return len(t) == len(p) and all(a == b or a.startswith("{") for a, b in zip(t, p))


def test_revoked_key_is_refused(client):
    store = client.app.state.tuneserve.store
    key, info = store.create_api_key("carol", name="temp")
    h = {"Authorization": f"Bearer {key}"}
    assert client.get("/v1/files", headers=h).status_code == 200
    store.revoke_api_key(info.id)
    assert_error(client.get("/v1/files", headers=h), 401)


def test_health_needs_no_key(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json()["checks"] == {"database": "ok", "broker": "ok", "engine": "disabled"}
    assert client.get("/").status_code == 200 and "html" in client.get("/").headers["content-type"]


def test_readyz_reports_broken_broker(make_settings):
    with TestClient(create_app(make_settings(redis_url="redis://127.0.0.1:1/0"))) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["checks"]["broker"] == "unreachable"
        assert c.get("/healthz").status_code == 200


def test_error_shapes(client):
    err = assert_error(client.get("/v1/nope", headers=AUTH_A), 404)
    assert err["type"] == "invalid_request_error"
    assert_error(client.put("/healthz"), 405)
    err = assert_error(client.post("/v1/fine_tuning/jobs", headers={**AUTH_A, "Content-Type": "application/json"},
                                   content=b"{not json"), 400)
    assert err["type"] == "invalid_request_error"
    # Shape errors: every problem listed, each with its field path.
    err = assert_error(client.post("/v1/fine_tuning/jobs", headers=AUTH_A,
                                   json={"model": 5, "seed": "x", "metadata": {"a": 1},
                                         "training_dataset": {"path": "", "max_rows": 0}}), 400)
    params = {d["param"] for d in err["details"]}
    assert {"model", "seed", "metadata.a", "training_dataset.path", "training_dataset.max_rows"} <= params
    assert err["param"] in params
    err = assert_error(client.get("/v1/fine_tuning/jobs", headers=AUTH_A, params={"limit": "many"}), 400,
                       param="limit")


def test_unknown_exception_is_a_clean_500(settings):
    app = create_app(settings)

    @app.get("/boom")
    def boom():
        raise RuntimeError("secret internals /etc/shadow")

    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/boom")
        err = assert_error(r, 500, code="internal_error")
        assert "secret" not in r.text and "Traceback" not in r.text


def test_queue_full_sets_retry_after(settings):
    from service.core.errors import QueueFull
    app = create_app(settings)

    @app.get("/busy")
    def busy():
        raise QueueFull(retry_after=2.5)

    with TestClient(app) as c:
        r = c.get("/busy")
        assert_error(r, 429, code="queue_full")
        assert r.headers["retry-after"] == "3"


def test_chat_is_503_when_engine_disabled(client):
    r = client.post("/v1/chat/completions", headers=AUTH_A,
                    json={"model": BASE, "messages": [{"role": "user", "content": "hi"}]})
    assert_error(r, 503, code="engine_unavailable")
    assert_error(client.post("/chat", headers=AUTH_A, json={"query": "hi"}), 503)


def _publish(settings, tenant: str, name: str, tmp_path) -> None:
    from service.core.registry import AdapterRegistry
    src = tmp_path / f"src-{tenant}-{name}"
    src.mkdir(exist_ok=True)
    (src / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}))
    (src / "adapter_model.safetensors").write_bytes(b"not really safetensors")
    AdapterRegistry(settings.resolved_registry_dir).publish(
        tenant=tenant, name=name, source_dir=src,
        manifest={"base_model": BASE, "target_modules": ["q_proj"], "r": 4, "lora_alpha": 8.0,
                  "job_id": "ftjob-abc", "metrics": {"bleu-4": 1.5}})


def test_models_and_adapters_are_tenant_scoped(client, settings, tmp_path):
    _publish(settings, "alice", "ft-ads-1", tmp_path)
    _publish(settings, "alice", "ft-ads-1", tmp_path)  # version 2
    _publish(settings, "bob", "ft-bob-1", tmp_path)

    models = client.get("/v1/models", headers=AUTH_A).json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [BASE, "ft-ads-1"]
    assert models["data"][1]["version"] == 2 and models["data"][0]["owned_by"] == "tuneserve"
    assert client.get("/v1/models/ft-ads-1", headers=AUTH_A).json()["id"] == "ft-ads-1"
    assert client.get(f"/v1/models/{BASE}", headers=AUTH_A).json()["kind"] == "base"
    assert [m["id"] for m in client.get("/v1/models", headers=AUTH_B).json()["data"]] == [BASE, "ft-bob-1"]

    adapters = client.get("/v1/adapters", headers=AUTH_A).json()["data"]
    assert len(adapters) == 1 and adapters[0]["metrics"] == {"bleu-4": 1.5} and "tenant" not in adapters[0]
    assert client.get("/v1/adapters/ft-ads-1", headers=AUTH_A, params={"version": 1}).json()["version"] == 1
    assert [a["version"] for a in client.get("/v1/adapters/ft-ads-1/versions", headers=AUTH_A).json()["data"]] == [1, 2]

    # Another tenant's adapter answers 404 everywhere, as does a hostile name.
    for name in ("ft-ads-1", "..%2Falice%2Fft-ads-1", "%2E%2E", "a%E2%80%AEb", "FT-ADS-1", "ft-ads-1%00"):
        assert_error(client.get(f"/v1/models/{name}", headers=AUTH_B), 404)
        assert_error(client.get(f"/v1/adapters/{name}", headers=AUTH_B), 404)
        assert_error(client.delete(f"/v1/adapters/{name}", headers=AUTH_B), 404)
        assert_error(client.get(f"/v1/adapters/{name}/export", headers=AUTH_B), 404)
        assert_error(client.delete(f"/v1/models/{name}", headers=AUTH_B), 404)
    assert_error(client.post("/v1/chat/completions", headers=AUTH_B,
                             json={"model": "ft-ads-1", "messages": [{"role": "user", "content": "x"}]}), 503)

    # Export (the registry's PEFT pair) as zip and tar.
    import io
    import tarfile
    import zipfile
    r = client.get("/v1/adapters/ft-ads-1/export", headers=AUTH_A, params={"format": "peft"})
    assert r.status_code == 200, r.text
    names = zipfile.ZipFile(io.BytesIO(r.content)).namelist()
    assert {n.split("/", 1)[1] for n in names} == {"adapter_config.json", "adapter_model.safetensors", "manifest.json"}
    r = client.get("/v1/adapters/ft-ads-1/export", headers=AUTH_A, params={"format": "peft", "archive": "tar"})
    assert r.status_code == 200
    assert any(m.name.endswith("adapter_model.safetensors") for m in tarfile.open(fileobj=io.BytesIO(r.content)))
    assert_error(client.get("/v1/adapters/ft-ads-1/export", headers=AUTH_A, params={"format": "gguf"}), 400,
                 param="format")

    # Delete one version, then all.
    assert client.delete("/v1/adapters/ft-ads-1", headers=AUTH_A, params={"version": 1}).json()["versions"] == [1]
    assert client.delete("/v1/models/ft-ads-1", headers=AUTH_A).json() == {"id": "ft-ads-1", "object": "model",
                                                                          "deleted": True}
    assert [m["id"] for m in client.get("/v1/models", headers=AUTH_A).json()["data"]] == [BASE]
    assert [m["id"] for m in client.get("/v1/models", headers=AUTH_B).json()["data"]] == [BASE, "ft-bob-1"]


def test_metrics_parse_and_need_no_key(client):
    fid = upload_ok(client)
    client.post("/v1/fine_tuning/jobs", headers=AUTH_A, json={"model": BASE, "training_file": fid})
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    jobs = {s.labels["status"]: s.value for s in families["tuneserve_jobs"].samples}
    assert jobs["queued"] == 1 and jobs["running"] == 0
    assert [s.value for s in families["tuneserve_queue_depth"].samples] == [1]
    assert "tuneserve_http_requests" in families and "tuneserve_chat_request_duration_seconds" in families
    assert "tuneserve_engine_ready" in families
    assert "alice" not in r.text and fid not in r.text  # aggregates only


def test_two_apps_do_not_share_metrics(make_settings, tmp_path):
    with TestClient(create_app(make_settings())) as a:
        a.get("/healthz")
        a.get("/healthz")
        with TestClient(create_app(make_settings(data_dir=tmp_path / "other"))) as b:
            text = b.get("/metrics").text
            assert 'route="/healthz"' not in text


def test_metrics_can_be_switched_off(make_settings):
    with TestClient(create_app(make_settings(metrics_enabled=False))) as c:
        assert_error(c.get("/metrics"), 404)


def test_two_authorization_headers_are_a_400(client):
    """Which of two headers counts would be a guess (a proxy may add one): refuse both orders."""
    from .conftest import KEY_A, KEY_B
    for pair in ([KEY_A, KEY_B], [KEY_A, KEY_A], ["wrong", KEY_A]):
        headers = [("authorization", f"Bearer {k}") for k in pair]
        r = client.get("/v1/files", headers=headers)
        err = assert_error(r, 400, param="Authorization", code="duplicate_header")
        assert "exactly one" in err["message"]


@pytest.mark.parametrize("value", ["Bearer  {key}", "Bearer {key}\t", "Bearer \t{key}", "Bearer\t{key}",
                                   "Bearer {key} x", "Bearer {key}\u00a0"],
                         ids=["two-spaces", "trailing-tab", "leading-tab", "tab-separator", "two-words", "nbsp"])
def test_a_key_with_surrounding_whitespace_is_not_accepted(client, value):
    from .conftest import KEY_A
    r = client.get("/v1/files", headers={"Authorization": value.format(key=KEY_A).encode("utf-8")})
    assert_error(r, 401, code="invalid_api_key")
    assert client.get("/v1/files", headers={"Authorization": f"bearer {KEY_A}"}).status_code == 200  # scheme: any case


def test_keys_with_whitespace_cannot_be_configured(make_settings, tmp_path):
    from service.core.errors import InvalidInput
    from service.core.store import Store
    with pytest.raises(ValueError, match="visible ASCII"):
        make_settings(api_keys="key with space:alice").parsed_api_keys()
    store = Store(f"sqlite:///{tmp_path / 'k.db'}")
    try:
        for bad in (" lead", "trail ", "in side", "tab\t", "é"):
            with pytest.raises(InvalidInput):
                store.create_api_key("alice", key=bad)
    finally:
        store.close()


def test_an_unknown_after_cursor_is_a_404_the_spec_documents(client):
    """Every list with an `after` cursor: one naming no object of that list (a made-up id, the
    id of another list, another tenant's) answers 404 on `after`, and the spec says so for each."""
    fid = upload_ok(client)
    job = client.post("/v1/fine_tuning/jobs", headers=AUTH_A, json={"model": BASE, "training_file": fid}).json()
    ep = client.post("/v1/webhook_endpoints", headers=AUTH_A, json={
        "name": "n", "url": "http://127.0.0.1:9/hook", "event_types": ["fine_tuning.job.succeeded"]})
    assert ep.status_code == 200, ep.text
    lists = ["/v1/files", "/v1/fine_tuning/jobs", f"/v1/fine_tuning/jobs/{job['id']}/events",
             f"/v1/fine_tuning/jobs/{job['id']}/checkpoints", "/v1/webhook_endpoints",
             f"/v1/webhook_endpoints/{ep.json()['id']}/deliveries"]
    spec = client.get("/openapi.json").json()
    for path in lists:
        for cursor in ("nope-0", fid if "files" not in path else job["id"]):
            err = assert_error(client.get(path, headers=AUTH_A, params={"after": cursor}), 404, code="not_found")
            assert err["param"] == "after", (path, err)
        op = spec["paths"][next(p for p in spec["paths"] if _match(p, path))]["get"]
        assert "404" in op["responses"], path
        after = next(p for p in op["parameters"] if p["name"] == "after")
        assert "404" in after["description"], path
    assert_error(client.get("/v1/fine_tuning/jobs", headers=AUTH_B, params={"after": job["id"]}), 404,
                 code="not_found")
