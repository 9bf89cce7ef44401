"""Store behaviour, run against SQLite and PostgreSQL (see conftest.py)."""
from __future__ import annotations

import re
import threading
from datetime import timezone

import pytest

from harness import age_heartbeats
from service.core.domain import (
    TRANSITIONS,
    DatasetFormat,
    DatasetSource,
    JobError,
    JobProgress,
    JobStatus,
    TrainingSpec,
)
from service.core.errors import Conflict, InvalidInput, NotFound, UnknownCursor
from service.core.store import Store


def _file(store: Store, tenant: str = "acme", **kw):
    args = dict(tenant=tenant, filename="train.jsonl", purpose="fine-tune", bytes=123, rows=4,
                format=DatasetFormat.advertisegen, sha256="ab" * 32, path="/data/files/x.jsonl")
    args.update(kw)
    return store.create_file(**args)


def _job(store: Store, tenant: str = "acme", **kw):
    args = dict(tenant=tenant, model="chatglm3-6b", spec=TrainingSpec(max_steps=3, lora_r=4))
    args.update(kw)
    return store.create_job(**args)


# ---------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------
def test_file_roundtrip_and_tenant_isolation(store: Store):
    f = _file(store)
    assert re.fullmatch(r"file-[0-9a-f]{24}", f.id)
    assert f.created_at.tzinfo is not None and f.created_at.utcoffset().total_seconds() == 0
    assert store.get_file(f.id, "acme") == f
    assert store.get_file(f.id, None) == f  # workers see every tenant's files
    with pytest.raises(NotFound):
        store.get_file(f.id, "other")
    with pytest.raises(NotFound):
        store.get_file("file-000000000000000000000000", "acme")
    other = _file(store, tenant="other")
    g = _file(store, purpose="other-purpose")
    assert [x.id for x in store.list_files("acme")] == [g.id, f.id]  # newest first
    assert [x.id for x in store.list_files("acme", purpose="fine-tune")] == [f.id]
    assert [x.id for x in store.list_files("other")] == [other.id]


def test_delete_file_refused_while_a_live_job_uses_it(store: Store):
    f = _file(store)
    v = _file(store)
    job = _job(store, training_file=f.id, validation_file=v.id)
    with pytest.raises(NotFound):
        store.delete_file(f.id, "other")
    with pytest.raises(Conflict):
        store.delete_file(f.id, "acme")
    with pytest.raises(Conflict):
        store.delete_file(v.id, "acme")
    store.transition(job.id, JobStatus.cancelled)
    assert store.delete_file(f.id, "acme").id == f.id
    with pytest.raises(NotFound):
        store.get_file(f.id, "acme")


# ---------------------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------------------
def test_job_roundtrip_keeps_every_field(store: Store):
    spec = TrainingSpec(max_steps=7, lora_r=16, lora_target_modules=["query_key_value"], lr_scheduler="cosine")
    ds = DatasetSource(path="/data/adgen", split="train[:10]", content_column="c", summary_column="s")
    job = store.create_job(tenant="acme", model="m", spec=spec, training_dataset=ds, validation_dataset=ds,
                           suffix="ads", metadata={"team": "x"}, status=JobStatus.validating_files)
    assert re.fullmatch(r"ftjob-[0-9a-f]{24}", job.id)
    got = store.get_job(job.id, "acme")
    assert got == job
    assert got.spec == spec and got.training_dataset == ds and got.metadata == {"team": "x"}
    assert got.status is JobStatus.validating_files
    assert got.attempts == 0 and got.started_at is None and got.result == {}
    assert store.get_job(job.id) == job  # tenant None = any
    with pytest.raises(NotFound):
        store.get_job(job.id, "other")


def test_legal_transitions_and_timestamps(store: Store):
    job = _job(store)
    running = store.transition(job.id, JobStatus.running, worker_id="w1")
    assert running.status is JobStatus.running and running.attempts == 1 and running.worker_id == "w1"
    assert running.started_at is not None and running.heartbeat_at is not None and running.finished_at is None
    # redelivery after a dead worker: running -> queued -> running keeps the first started_at
    store.transition(job.id, JobStatus.queued)
    again = store.transition(job.id, JobStatus.running, worker_id="w2")
    assert again.attempts == 2 and again.started_at == running.started_at and again.worker_id == "w2"
    done = store.transition(job.id, JobStatus.succeeded, fine_tuned_model="ft-abc", result={"bleu": 1.5})
    assert done.status is JobStatus.succeeded and done.fine_tuned_model == "ft-abc"
    assert done.finished_at is not None and done.finished_at >= done.started_at
    assert done.result == {"bleu": 1.5}


def test_failed_transition_stores_error(store: Store):
    job = _job(store)
    store.transition(job.id, JobStatus.running)
    err = JobError(code="out_of_memory", message="CUDA OOM at micro batch 8", param="hyperparameters.batch_size")
    failed = store.transition(job.id, JobStatus.failed, error=err)
    assert failed.error == err and failed.finished_at is not None


@pytest.mark.parametrize("old", list(JobStatus))
def test_every_illegal_transition_is_a_conflict(store: Store, old: JobStatus):
    # Walk a job into `old` along legal edges, then try every target not allowed from it.
    path = {
        JobStatus.validating_files: [],
        JobStatus.queued: [JobStatus.queued],
        JobStatus.running: [JobStatus.queued, JobStatus.running],
        JobStatus.succeeded: [JobStatus.queued, JobStatus.running, JobStatus.succeeded],
        JobStatus.failed: [JobStatus.failed],
        JobStatus.cancelled: [JobStatus.cancelled],
    }[old]
    for new in JobStatus:
        if new in TRANSITIONS[old]:
            continue
        job = _job(store, status=JobStatus.validating_files)
        for step in path:
            store.transition(job.id, step)
        with pytest.raises(Conflict):
            store.transition(job.id, new)
        assert store.get_job(job.id).status is old


def test_transition_unknown_job_is_not_found(store: Store):
    with pytest.raises(NotFound):
        store.transition("ftjob-000000000000000000000000", JobStatus.running)


def test_transition_race_exactly_one_winner(store: Store, db_url: str):
    """Two workers (two Store objects = two connection pools, like two processes) race to
    start the same queued job; exactly one wins, the other gets Conflict."""
    other = Store(db_url)
    try:
        for _ in range(5):
            job = _job(store)
            barrier = threading.Barrier(4)
            outcomes: list[str] = []
            lock = threading.Lock()

            def claim(st: Store, worker: str):
                barrier.wait()
                try:
                    st.transition(job.id, JobStatus.running, worker_id=worker)
                    res = "won:" + worker
                except Conflict:
                    res = "conflict"
                with lock:
                    outcomes.append(res)

            threads = [threading.Thread(target=claim, args=(st, f"w{i}"))
                       for i, st in enumerate([store, other, store, other])]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            winners = [o for o in outcomes if o.startswith("won:")]
            assert len(outcomes) == 4 and len(winners) == 1, outcomes
            final = store.get_job(job.id)
            assert final.attempts == 1 and final.worker_id == winners[0][4:]
    finally:
        other.close()


def test_list_jobs_pagination_newest_first(store: Store):
    jobs = [_job(store) for _ in range(5)]
    _job(store, tenant="other")
    page, more = store.list_jobs("acme", limit=2)
    assert [j.id for j in page] == [jobs[4].id, jobs[3].id] and more
    page2, more2 = store.list_jobs("acme", after=page[-1].id, limit=2)
    assert [j.id for j in page2] == [jobs[2].id, jobs[1].id] and more2
    page3, more3 = store.list_jobs("acme", after=page2[-1].id, limit=2)
    assert [j.id for j in page3] == [jobs[0].id] and not more3
    everything, more_all = store.list_jobs("acme", limit=100)
    assert len(everything) == 5 and not more_all
    exact, more_exact = store.list_jobs("acme", limit=5)
    assert len(exact) == 5 and not more_exact
    other_jobs, _ = store.list_jobs("other")
    with pytest.raises(UnknownCursor):  # another tenant's id is no cursor here (404 on `after`)
        store.list_jobs("acme", after=other_jobs[0].id)
    with pytest.raises(UnknownCursor):
        store.list_jobs("acme", after="ftjob-nope")
    assert store.list_jobs("nobody") == ([], False)


def test_delete_job_removes_events(store: Store):
    job = _job(store)
    store.add_event(job.id, "created")
    store.delete_job(job.id)
    with pytest.raises(NotFound):
        store.get_job(job.id)
    assert store.all_events(job.id) == []
    store.delete_job(job.id)  # idempotent


def _job_once(store: Store, key: str, fingerprint: str = "f" * 64, tenant: str = "acme"):
    return store.create_job_once(idempotency_key=key, fingerprint=fingerprint, tenant=tenant, model="chatglm3-6b",
                                 spec=TrainingSpec(max_steps=3, lora_r=4))


def test_create_job_once_per_idempotency_key(store: Store):
    job, created = _job_once(store, "k1")
    assert created and store.get_job(job.id).status is JobStatus.queued
    store.transition(job.id, JobStatus.running, worker_id="w")
    again, created_again = _job_once(store, "k1")
    assert not created_again and again.id == job.id and again.status is JobStatus.running  # the job as it is now
    other, created_other = _job_once(store, "k1", tenant="other")  # keys are per tenant
    assert created_other and other.id != job.id
    with pytest.raises(Conflict) as exc:  # a key names one request: another body is refused
        _job_once(store, "k1", fingerprint="e" * 64)
    assert exc.value.code == "idempotency_key_reused" and exc.value.param == "Idempotency-Key"
    assert len(store.list_jobs("acme", limit=10)[0]) == 1


def test_deleted_job_frees_its_idempotency_key(store: Store):
    """A job rolled back after a failed enqueue takes its key along: the client's retry creates it."""
    job, _ = _job_once(store, "k2")
    store.delete_job(job.id)
    again, created = _job_once(store, "k2")
    assert created and again.id != job.id


def test_create_job_once_race_one_job(store: Store, db_url: str):
    """Retries of one request arriving at once, through two Stores (two processes' pools): one
    job, and every caller gets it."""
    other = Store(db_url)
    try:
        for n in range(3):
            barrier = threading.Barrier(4)
            got: list[tuple[str, bool]] = []
            lock = threading.Lock()

            def submit(st: Store, key: str, barrier: threading.Barrier, got: list, lock: threading.Lock):
                barrier.wait()
                job, created = _job_once(st, key)
                with lock:
                    got.append((job.id, created))

            threads = [threading.Thread(target=submit, args=(st, f"race-{n}", barrier, got, lock))
                       for st in [store, other, store, other]]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert len(got) == 4 and len({jid for jid, _ in got}) == 1, got
            assert sum(created for _, created in got) == 1, got
        assert len(store.list_jobs("acme", limit=10)[0]) == 3
    finally:
        other.close()


def test_progress_and_result_merge(store: Store):
    job = _job(store)
    store.transition(job.id, JobStatus.running)
    prog = JobProgress(step=3, total_steps=10, loss=2.5, tokens_per_second=123.0, eta_seconds=7.0)
    store.update_progress(job.id, prog, trained_tokens=999)
    got = store.get_job(job.id)
    assert got.progress == prog and got.trained_tokens == 999
    store.update_progress(job.id, JobProgress(step=4))
    assert store.get_job(job.id).trained_tokens == 999  # untouched when not given
    with pytest.raises(NotFound):
        store.update_progress("ftjob-000000000000000000000000", prog)


# ---------------------------------------------------------------------------------------
# Events
# ---------------------------------------------------------------------------------------
def test_events_order_and_cursor(store: Store):
    job = _job(store)
    other = _job(store)
    evs = [store.add_event(job.id, f"step {i}", type="metrics", data={"step": i, "loss": 3.0 - i / 10})
           for i in range(7)]
    store.add_event(other.id, "unrelated")
    assert re.fullmatch(r"ftevent-[0-9a-f]{24}", evs[0].id)
    page, more = store.list_events(job.id, limit=3)
    assert [e.message for e in page] == ["step 6", "step 5", "step 4"] and more
    page, more = store.list_events(job.id, after=page[-1].id, limit=3)
    assert [e.message for e in page] == ["step 3", "step 2", "step 1"] and more
    page, more = store.list_events(job.id, after=page[-1].id, limit=3)
    assert [e.message for e in page] == ["step 0"] and not more
    assert [e.id for e in store.all_events(job.id)] == [e.id for e in evs]
    assert store.all_events(job.id)[2].data == {"step": 2, "loss": 2.8}
    with pytest.raises(UnknownCursor):
        store.list_events(other.id, after=evs[0].id)  # a cursor from another job
    with pytest.raises(NotFound):
        store.add_event("ftjob-000000000000000000000000", "x")
    warn = store.add_event(job.id, "careful", level="warn")
    assert store.list_events(job.id, limit=1)[0][0] == warn


# ---------------------------------------------------------------------------------------
# Cancel, heartbeat, queries for the reaper and metrics
# ---------------------------------------------------------------------------------------
def test_cancel_semantics(store: Store):
    queued = _job(store)
    with pytest.raises(NotFound):
        store.request_cancel(queued.id, "other")
    c = store.request_cancel(queued.id, "acme")
    assert c.status is JobStatus.cancelled and c.finished_at is not None
    with pytest.raises(Conflict):  # final
        store.request_cancel(queued.id, "acme")
    with pytest.raises(Conflict):  # the worker cannot start it any more
        store.transition(queued.id, JobStatus.running)

    validating = _job(store, status=JobStatus.validating_files)
    assert store.request_cancel(validating.id, "acme").status is JobStatus.cancelled

    running = _job(store)
    store.transition(running.id, JobStatus.running)
    assert not store.is_cancel_requested(running.id)
    r = store.request_cancel(running.id, "acme")
    assert r.status is JobStatus.running and r.cancel_requested and r.finished_at is None
    assert store.is_cancel_requested(running.id)
    assert store.request_cancel(running.id, "acme").cancel_requested  # repeat is harmless
    done = store.transition(running.id, JobStatus.cancelled)
    assert done.status is JobStatus.cancelled and done.finished_at is not None
    assert store.is_cancel_requested(queued.id)
    with pytest.raises(NotFound):
        store.is_cancel_requested("ftjob-000000000000000000000000")


def test_heartbeat_and_stale_running_jobs(store: Store):
    a, b, c = _job(store), _job(store), _job(store)
    store.transition(a.id, JobStatus.running, worker_id="w1")
    store.transition(b.id, JobStatus.running, worker_id="w2")
    assert store.stale_running_jobs(3600) == []
    age_heartbeats(store, 600)  # both beat 10 minutes ago...
    store.heartbeat(b.id, "w2b")  # ...then b beats again
    stale = store.stale_running_jobs(300)
    assert [j.id for j in stale] == [a.id]  # b beat recently; c is not running
    assert store.get_job(b.id).worker_id == "w2b"
    assert store.get_job(b.id).heartbeat_at.tzinfo is not None
    age_heartbeats(store, 1, b.id)  # "older than 0 s" made so, not slept into
    assert {j.id for j in store.stale_running_jobs(0)} == {a.id, b.id}
    with pytest.raises(NotFound):
        store.heartbeat("ftjob-000000000000000000000000", "w")
    assert c.status is JobStatus.queued


def test_jobs_with_status_and_counts(store: Store):
    a, b, c = _job(store), _job(store), _job(store, tenant="other")
    store.transition(b.id, JobStatus.running)
    store.transition(c.id, JobStatus.failed)
    assert [j.id for j in store.jobs_with_status([JobStatus.queued, JobStatus.running])] == [a.id, b.id]
    assert store.jobs_with_status([]) == []
    counts = store.count_jobs_by_status()
    assert counts == {"validating_files": 0, "queued": 1, "running": 1, "succeeded": 0, "failed": 1,
                      "cancelled": 0}


# ---------------------------------------------------------------------------------------
# API keys
# ---------------------------------------------------------------------------------------
def test_api_keys(store: Store):
    key, info = store.create_api_key("acme", name="ci")
    assert key.startswith("ts-") and len(key) > 40
    assert info.tenant == "acme" and info.name == "ci" and key.startswith(info.prefix) and len(info.prefix) < 12
    assert store.tenant_for_key(key) == "acme"
    assert store.tenant_for_key(key + "x") is None and store.tenant_for_key("") is None

    # idempotent for a given key (every process hashes TUNESERVE_API_KEYS at startup)
    k1, i1 = store.create_api_key("beta", key="sk-beta-fixed")
    k2, i2 = store.create_api_key("beta", key="sk-beta-fixed")
    assert k1 == k2 == "sk-beta-fixed" and i1.id == i2.id
    with pytest.raises(Conflict):
        store.create_api_key("acme", key="sk-beta-fixed")
    assert [k.id for k in store.list_api_keys("beta")] == [i1.id]
    assert {k.tenant for k in store.list_api_keys()} == {"acme", "beta"}

    revoked = store.revoke_api_key(info.id)
    assert revoked.revoked_at is not None and revoked.revoked_at.tzinfo == timezone.utc
    assert store.tenant_for_key(key) is None
    # re-adding a revoked key from the environment does not resurrect it
    _, again = store.create_api_key("acme", key=key)
    assert again.revoked_at is not None and store.tenant_for_key(key) is None
    with pytest.raises(NotFound):
        store.revoke_api_key("key-nope")


def test_keys_are_stored_hashed(store: Store, db_url: str):
    import sqlalchemy as sa

    key, _ = store.create_api_key("acme")
    engine = sa.create_engine(db_url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect() as conn:
            rows = [tuple(r) for r in conn.execute(sa.text("SELECT * FROM ts_api_keys"))]
    finally:
        engine.dispose()
    assert rows and all(key not in str(col) for col in rows[0])


def test_two_stores_share_one_database(store: Store, db_url: str):
    """API and worker processes each open their own Store on the same database."""
    other = Store(db_url)  # create_all again must be a no-op
    try:
        job = _job(store)
        other.transition(job.id, JobStatus.running, worker_id="w")
        other.add_event(job.id, "hello from the worker")
        assert store.get_job(job.id).status is JobStatus.running
        assert store.all_events(job.id)[0].message == "hello from the worker"
    finally:
        other.close()


def test_sqlite_pragmas(tmp_path):
    import sqlalchemy as sa

    st = Store(f"sqlite:///{tmp_path / 'sub' / 'dir' / 'x.db'}")  # parent dirs are created
    try:
        with st._engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert isinstance(sa.__version__, str)
    finally:
        st.close()


def test_in_memory_sqlite_works():
    st = Store("sqlite://")
    try:
        job = _job(st)
        assert st.get_job(job.id).id == job.id
    finally:
        st.close()


def test_non_finite_floats_become_null(store: Store):
    """A diverged run logs NaN/inf; PostgreSQL's json type would refuse them."""
    job = _job(store)
    ev = store.add_event(job.id, "diverged", type="metrics", data={"loss": float("nan"), "grad": [float("inf"), 1.0]})
    store.update_progress(job.id, JobProgress(step=1, loss=float("inf")))
    store.transition(job.id, JobStatus.running)
    store.transition(job.id, JobStatus.succeeded, fine_tuned_model="ft-x", result={"eval_loss": float("-inf")})
    assert store.all_events(job.id)[0].data == {"loss": None, "grad": [None, 1.0]}
    assert ev.id == store.all_events(job.id)[0].id
    got = store.get_job(job.id)
    assert got.progress.loss is None and got.result == {"eval_loss": None}


def test_ping(store: Store):
    assert store.ping()
