"""Job submission under load (issue 11): 50 clients x 20 jobs against one real API process
(uvicorn, SQLite, a real redis-server of its own, no worker so every message stays on the broker to be
counted). Nothing may be lost: every 200 answer's job is one row in the store and exactly one
message on the broker, and there is nothing else in either. Latency is printed next to
GET /v1/models under the same load, never asserted (it depends on the machine).

Each client does what a careful real client does with a POST whose connection dropped before
an answer came: it retries a bounded number of times (the OpenAI SDK's 2) with the same
Idempotency-Key, so a retry of a request the server did take cannot create a second job; the
row and broker counts below would show one. The retries taken are printed (0 expected since the
API's keep-alive outlasts the client pool's: see Settings.keep_alive_s)."""
from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections import Counter
from functools import partial

import httpx
import pytest

from e2e_harness import AUTH_A, System, jsonl_bytes, sample_rows

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CLIENTS = 50
JOBS_PER_CLIENT = 20
MODEL_PROBES = 5  # clients polling GET /v1/models while the jobs go in
RETRIES = 2  # the OpenAI SDK's DEFAULT_MAX_RETRIES, for connection errors among others


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _summary(name: str, seconds: list[float]) -> str:
    ms = [s * 1000 for s in seconds]
    return (f"{name}: n={len(ms)} p50={statistics.median(ms):.0f} ms p99={_pct(ms, 0.99):.0f} ms "
            f"max={max(ms):.0f} ms")


async def _with_retries(send, dropped: list[str]) -> httpx.Response:
    """`send()` again, up to RETRIES times, when its connection dropped before any answer
    (connect/read/write error, server disconnected); the last attempt's error is the caller's."""
    for _ in range(RETRIES):
        try:
            return await send()
        except httpx.TransportError as exc:
            dropped.append(repr(exc))
    return await send()


async def _submit_all(url: str, body: dict) -> tuple[list[tuple[int, str | None]], list[float], list[float], float,
                                                     list[str]]:
    # The pool's keep-alive expiry is httpx's default (5 s), as in the OpenAI SDK.
    limits = httpx.Limits(max_connections=CLIENTS + MODEL_PROBES, max_keepalive_connections=CLIENTS + MODEL_PROBES)
    post_s: list[float] = []
    get_s: list[float] = []
    answers: list[tuple[int, str | None]] = []
    dropped: list[str] = []  # connection errors that were retried
    done = asyncio.Event()
    run = uuid.uuid4().hex[:8]
    async with httpx.AsyncClient(base_url=url, headers=AUTH_A, timeout=120, limits=limits) as http:
        async def submitter(i: int) -> None:
            for j in range(JOBS_PER_CLIENT):
                t0 = time.perf_counter()
                try:
                    # The same body and Idempotency-Key on every attempt of this submission.
                    job = {**body, "metadata": {"client": str(i), "n": str(j)}}
                    key = {"Idempotency-Key": f"load-{run}-{i}-{j}"}
                    r = await _with_retries(partial(http.post, "/v1/fine_tuning/jobs", json=job, headers=key),
                                            dropped)
                except httpx.HTTPError as exc:  # reported with the refusals, not as a crash of the loop
                    answers.append((0, repr(exc)))
                    continue
                post_s.append(time.perf_counter() - t0)
                answers.append((r.status_code, r.json().get("id") if r.status_code == 200 else r.text[:300]))

        async def prober() -> None:
            while not done.is_set():
                t0 = time.perf_counter()
                r = await _with_retries(lambda: http.get("/v1/models"), dropped)
                get_s.append(time.perf_counter() - t0)
                assert r.status_code == 200, r.text

        t0 = time.perf_counter()
        probes = [asyncio.create_task(prober()) for _ in range(MODEL_PROBES)]
        await asyncio.gather(*(submitter(i) for i in range(CLIENTS)))
        wall = time.perf_counter() - t0
        done.set()
        await asyncio.gather(*probes)
    return answers, post_s, get_s, wall, dropped


def test_fifty_clients_twenty_jobs_each_nothing_lost(tmp_path, demo_model, own_redis):
    import redis

    from workers.reaper import _job_id_of

    system = System(root=tmp_path / "load", redis_url=own_redis.url, base_model=demo_model,
                    overrides={"TUNESERVE_ENGINE_ENABLED": "false"})  # job submission only: no model to load
    api = system.start_api()
    try:
        with httpx.Client(base_url=api.url, headers=AUTH_A, timeout=60) as http:
            r = http.post("/v1/files", files={"file": ("t.jsonl", jsonl_bytes(sample_rows(8)), "application/jsonl")},
                          data={"purpose": "fine-tune"})
            assert r.status_code == 200, r.text
            base = http.get("/v1/models").json()["data"][0]["id"]
        body = {"model": base, "training_file": r.json()["id"], "hyperparameters": {"max_steps": 1}}

        answers, post_s, get_s, wall, dropped = asyncio.run(_submit_all(api.url, body))

        refused = [a for a in answers if a[0] != 200]
        assert not refused, f"{len(refused)} submissions refused, e.g. {refused[:3]}\n{api.log()[-3000:]}"
        ids = [jid for _, jid in answers]
        assert len(ids) == CLIENTS * JOBS_PER_CLIENT and len(set(ids)) == len(ids)
        store = system.store()
        try:
            rows, _ = store.list_jobs("alice", limit=len(ids) + 10)
            assert {j.id for j in rows} == set(ids), "every answered job is a row, and nothing else is"
            assert {j.status.value for j in rows} == {"queued"}
        finally:
            store.close()
        r = redis.Redis.from_url(system.redis_url)
        try:
            on_broker = Counter(_job_id_of(raw) for raw in r.lrange(system.queue, 0, -1))
        finally:
            r.close()
        assert set(on_broker) == set(ids), "every job on the broker, and nothing else"
        twice = [jid for jid, n in on_broker.items() if n != 1]
        assert not twice, f"enqueued more than once: {twice[:5]}"
        assert api.alive()
        print(f"\n{len(ids)} jobs from {CLIENTS} clients in {wall:.1f} s ({len(ids) / wall:.0f} jobs/s)\n"
              f"{_summary('POST /v1/fine_tuning/jobs', post_s)}\n{_summary('GET /v1/models (same load)', get_s)}\n"
              f"dropped connections retried: {len(dropped)} {dropped[:3]}")
    finally:
        system.stop_all()
