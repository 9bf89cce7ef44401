"""Issue 6 item 2 / "what must be shown": one consolidated corpus of hostile requests against the
live deployment (uvicorn + engine + worker + Redis). Every request must answer 4xx with an
OpenAI-shaped error body and leave nothing behind: no new file under the data dir, no new row
in any table, nothing published in the registry, nothing on the broker (queue empty, the worker
received nothing).

api_tests/api/ checks many of these one by one on an in-process app (TestClient); this corpus
runs them over real HTTP (real multipart framing, real sockets) against the whole system,
including the request shapes an in-process client cannot send (NUL in a part header, raw
non-UTF-8 bytes, invalid JSON)."""
from __future__ import annotations

import json
import sqlite3
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from e2e_harness import AUTH_A, AUTH_B, jsonl_bytes, sample_rows

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

GOOD = jsonl_bytes(sample_rows(4))


def multipart(filename: bytes, content: bytes, purpose: bytes = b"fine-tune") -> tuple[bytes, dict[str, str]]:
    """A hand-framed multipart body: the filename goes out byte for byte (NUL, raw UTF-8, ...)."""
    boundary = uuid.uuid4().hex
    b = boundary.encode()
    body = (b"--" + b + b'\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n' + purpose + b"\r\n"
            b"--" + b + b'\r\nContent-Disposition: form-data; name="file"; filename="' + filename + b'"\r\n'
            b"Content-Type: application/jsonl\r\n\r\n" + content + b"\r\n--" + b + b"--\r\n")
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = {"a": value}
    return value


@dataclass
class Hostile:
    id: str
    method: str
    path: str
    json: Any = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    upload: tuple[bytes, bytes] | tuple[bytes, bytes, bytes] | None = None  # (filename, content[, purpose])
    # The expected status when one is fixed; any 4xx otherwise.
    status: int | None = None


def job(base: str, **over) -> dict:
    body = {"model": base, "training_file": "{file}", "hyperparameters": {"max_steps": 2}}
    body.update(over)
    return body


def hp(**h) -> dict:
    return {"max_steps": 2, **h}


def corpus(base: str) -> list[Hostile]:
    huge_line = json.dumps({"content": "类" * 40_000, "summary": "x"}, ensure_ascii=False).encode() + b"\n"
    big_file = GOOD * (5 * 1024 * 1024 // len(GOOD) + 1)  # > TUNESERVE_MAX_UPLOAD_BYTES (4 MiB)
    J = "/v1/fine_tuning/jobs"
    C = "/v1/chat/completions"
    msg = [{"role": "user", "content": "hi"}]
    return [
        # --- uploads -----------------------------------------------------------------------
        Hostile("upload-non-utf8", "POST", "/v1/files",
                upload=(b"gbk.jsonl", '{"content": "类型#裙", "summary": "红色"}\n'.encode("gbk"))),
        Hostile("upload-latin1-bytes", "POST", "/v1/files", upload=(b"bin.jsonl", b"\xff\xfe\x00\x80garbage\n")),
        Hostile("upload-deeply-nested-row", "POST", "/v1/files",
                upload=(b"deep.jsonl", json.dumps({"content": nested(500), "summary": "x"}).encode() + b"\n")),
        Hostile("upload-huge-line", "POST", "/v1/files", upload=(b"huge.jsonl", GOOD + huge_line)),
        Hostile("upload-over-size-limit", "POST", "/v1/files", upload=(b"big.jsonl", big_file), status=413),
        Hostile("upload-nan-literal", "POST", "/v1/files",
                upload=(b"nan.jsonl", b'{"content": NaN, "summary": "x"}\n')),
        Hostile("upload-wrong-field-type", "POST", "/v1/files",
                upload=(b"types.jsonl", b'{"content": ["a"], "summary": {"b": 1}}\n')),
        Hostile("upload-empty-file", "POST", "/v1/files", upload=(b"empty.jsonl", b"")),
        Hostile("upload-name-dotdot", "POST", "/v1/files", upload=(b"../../etc/cron.d/x.jsonl", GOOD)),
        Hostile("upload-name-slash", "POST", "/v1/files", upload=(b"sub/dir.jsonl", GOOD)),
        Hostile("upload-name-nul", "POST", "/v1/files", upload=(b"a\x00.jsonl", GOOD)),
        Hostile("upload-name-bidi-override", "POST", "/v1/files",
                upload=("train\u202elnosj.exe".encode(), GOOD)),
        Hostile("upload-name-fullwidth-lookalike", "POST", "/v1/files", upload=("ｔｒａｉｎ.jsonl".encode(), GOOD)),
        Hostile("upload-name-zero-width", "POST", "/v1/files", upload=("tr\u200bain.jsonl".encode(), GOOD)),
        Hostile("upload-purpose-traversal", "POST", "/v1/files", upload=(b"ok.jsonl", GOOD, b"../../fine-tune")),
        Hostile("upload-not-multipart", "POST", "/v1/files", json={"file": "x", "purpose": "fine-tune"}),
        # --- jobs: absurd hyperparameters -------------------------------------------------
        Hostile("job-lora-r-1e9", "POST", J, json=job(base, hyperparameters=hp(lora_r=10**9)), status=400),
        Hostile("job-negative-lr", "POST", J, json=job(base, hyperparameters=hp(learning_rate=-1)), status=400),
        Hostile("job-n-epochs-nan", "POST", J, json=job(base, hyperparameters={"n_epochs": "NaN"}), status=400),
        Hostile("job-n-epochs-inf", "POST", J, json=job(base, hyperparameters={"n_epochs": 1e308 * 10}),
                status=400),
        Hostile("job-max-steps-bignum", "POST", J, json=job(base, hyperparameters=hp(max_steps=10**40)),
                status=400),
        Hostile("job-batch-zero", "POST", J, json=job(base, hyperparameters=hp(batch_size=0)), status=400),
        Hostile("job-target-module-injection", "POST", J,
                json=job(base, hyperparameters=hp(lora_target_modules=["q_proj; import os"])), status=400),
        Hostile("job-unknown-hyperparameter", "POST", J,
                json=job(base, hyperparameters=hp(trust_remote_code=True)), status=400),
        # --- jobs: code execution / paths -------------------------------------------------
        Hostile("job-trust-remote-code-top-level", "POST", J, json=job(base, trust_remote_code=True)),
        Hostile("job-trust-remote-code-in-dataset", "POST", J,
                json=job(base, training_file=None,
                         training_dataset={"path": "HasturOfficial/adgen", "trust_remote_code": True})),
        Hostile("job-dataset-etc-passwd", "POST", J,
                json=job(base, training_file=None, training_dataset={"path": "/etc/passwd"}), status=400),
        Hostile("job-dataset-dotdot", "POST", J,
                json=job(base, training_file=None, training_dataset={"path": "../../../../etc"}), status=400),
        Hostile("job-dataset-nul", "POST", J,
                json=job(base, training_file=None, training_dataset={"path": "/tmp/x\x00.json"}), status=400),
        Hostile("job-model-zero-width", "POST", J, json=job(base, model=base + "\u200b"), status=400),
        Hostile("job-model-path", "POST", J, json=job(base, model="/etc/passwd"), status=400),
        Hostile("job-suffix-dotdot", "POST", J, json=job(base, suffix="../../alice"), status=400),
        Hostile("job-suffix-slash", "POST", J, json=job(base, suffix="a/b"), status=400),
        Hostile("job-suffix-nul", "POST", J, json=job(base, suffix="a\x00b"), status=400),
        Hostile("job-suffix-rtl", "POST", J, json=job(base, suffix="ok\u202eexe"), status=400),
        Hostile("job-suffix-fullwidth", "POST", J, json=job(base, suffix="ｅｖｉｌ"), status=400),
        Hostile("job-other-tenants-file", "POST", J, json=job(base), headers=AUTH_B, status=400),
        Hostile("job-metadata-flood", "POST", J, json=job(base, metadata={f"k{i}": "v" for i in range(1000)}),
                status=400),
        # Raw text: 100k levels, far past Python's recursion limit on the server's side.
        Hostile("job-deeply-nested-body", "POST", J, headers={"Content-Type": "application/json"},
                content=b'{"model": "x", "hyperparameters": ' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_001),
        Hostile("chat-deeply-nested-body", "POST", C, headers={"Content-Type": "application/json"},
                content=b'{"model": "x", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        Hostile("job-invalid-json", "POST", J, content=b'{"model": "x", "training_file": ',
                headers={"Content-Type": "application/json"}),
        Hostile("job-json-not-object", "POST", J, json=["model", base]),
        Hostile("job-non-utf8-json", "POST", J, content=b'{"model": "\xff\xfe"}',
                headers={"Content-Type": "application/json"}),
        # --- chat ------------------------------------------------------------------------------
        Hostile("chat-max-tokens-1e9", "POST", C, json={"model": base, "messages": msg, "max_tokens": 10**9}),
        Hostile("chat-model-traversal", "POST", C, json={"model": "../../bob/ft-x", "messages": msg}),
        Hostile("chat-model-nul", "POST", C, json={"model": "ft-x\x00", "messages": msg}),
        Hostile("chat-model-bidi", "POST", C, json={"model": "ft-\u202ex", "messages": msg}),
        Hostile("chat-bad-role", "POST", C, json={"model": base, "messages": [{"role": "root", "content": "x"}]}),
        Hostile("chat-empty-messages", "POST", C, json={"model": base, "messages": []}),
        Hostile("chat-n-5", "POST", C, json={"model": base, "messages": msg, "n": 5}),
        Hostile("chat-invalid-json", "POST", C, content=b"{not json", headers={"Content-Type": "application/json"}),
        Hostile("simple-chat-adapter-traversal", "POST", "/chat", json={"adapter": "../../../etc/passwd",
                                                                         "query": "hi"}),
        # --- adapters / models by name ---------------------------------------------------
        Hostile("adapter-get-traversal", "GET", "/v1/adapters/..%2F..%2Fbob"),
        Hostile("adapter-delete-traversal", "DELETE", "/v1/adapters/..%2F..%2Fbob"),
        Hostile("adapter-export-traversal", "GET", "/v1/adapters/..%2F..%2F..%2Fetc/export"),
        Hostile("model-delete-traversal", "DELETE", "/v1/models/../../alice/x"),
        Hostile("file-content-traversal", "GET", "/v1/files/..%2F..%2Ftuneserve.db/content"),
    ]


# ---------------------------------------------------------------------------------------
def _snapshot(deployment) -> dict:
    system = deployment.system
    con = sqlite3.connect(f"file:{system.data_dir / 'tuneserve.db'}?mode=ro", uri=True)
    try:
        rows = {t: con.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                for t in ("ts_files", "ts_jobs", "ts_job_events", "ts_api_keys")}
    finally:
        con.close()
    r = deployment.redis()
    try:
        queued = r.llen(system.queue)
    finally:
        r.close()
    return {
        "rows": rows,
        "data_files": sorted(str(p.relative_to(system.data_dir)) for p in system.data_dir.rglob("*")
                             if "jobs" not in p.relative_to(system.data_dir).parts[:1]),
        "broker_queue": queued,
        "worker_received": deployment.worker.log().count("] received"),
    }


@pytest.fixture(scope="module")
def live(deployment):
    c = httpx.Client(base_url=deployment.url, headers=AUTH_A, timeout=120)
    f = c.post("/v1/files", files={"file": ("alice.jsonl", GOOD, "application/jsonl")}, data={"purpose": "fine-tune"})
    assert f.status_code == 200, f.text
    yield deployment, c, f.json()["id"]
    c.close()


def _cases():
    # ids are known before the deployment (and its base model name) exists; bodies are built later.
    return [h.id for h in corpus("BASE")]


def test_corpus_is_big_enough():
    assert len(_cases()) >= 20 and len(set(_cases())) == len(_cases())


@pytest.mark.parametrize("case_id", _cases())
def test_hostile_request_is_refused_and_writes_nothing(live, case_id):
    deployment, c, file_id = live
    case = next(h for h in corpus(deployment.base_model) if h.id == case_id)
    body = case.json
    if isinstance(body, dict) and body.get("training_file") == "{file}":
        body = {**body, "training_file": file_id}
    if isinstance(body, dict) and body.get("training_file") is None and "training_file" in body:
        body = {k: v for k, v in body.items() if k != "training_file"}
    before = _snapshot(deployment)

    headers = {**AUTH_A, **case.headers}
    if case.upload is not None:
        content, mp_headers = multipart(*case.upload)
        r = c.request(case.method, case.path, content=content, headers={**headers, **mp_headers})
    elif case.content is not None:
        r = c.request(case.method, case.path, content=case.content, headers=headers)
    elif body is not None:
        r = c.request(case.method, case.path, content=json.dumps(body, ensure_ascii=False).encode(),
                      headers={**headers, "Content-Type": "application/json"})
    else:
        r = c.request(case.method, case.path, headers=headers)

    assert 400 <= r.status_code < 500, f"{case.id}: {r.status_code} {r.text[:500]}"
    if case.status is not None:
        assert r.status_code == case.status, f"{case.id}: {r.status_code} {r.text[:500]}"
    err = r.json()
    assert set(err) == {"error"} and err["error"]["message"], err
    after = _snapshot(deployment)
    assert after == before, f"{case.id} left something behind: {before} -> {after}"
    assert deployment.api.alive()


def test_max_tokens_beyond_the_context_is_refused_and_the_default_capped(live):
    """Within the schema's bound (<= 32768) but past the engine's context: a 400
    context_length_exceeded naming max_tokens, as OpenAI answers, nothing written. Without
    max_tokens the default is bounded by the context and reported as finish_reason "length"."""
    deployment, c, _ = live
    before = _snapshot(deployment)
    msgs = [{"role": "user", "content": "hi"}]
    r = c.post("/v1/chat/completions", json={"model": deployment.base_model, "max_tokens": 30_000,
                                             "temperature": 0, "messages": msgs})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "max_tokens" and err["code"] == "context_length_exceeded", err
    r = c.post("/v1/chat/completions", json={"model": deployment.base_model, "temperature": 0, "messages": msgs})
    assert r.status_code == 200, r.text
    # TUNESERVE_MAX_SEQ_LEN is 256 positions; the last sampled token never needs one, hence + 1.
    assert r.json()["usage"]["prompt_tokens"] + r.json()["usage"]["completion_tokens"] <= 256 + 1
    assert _snapshot(deployment) == before
