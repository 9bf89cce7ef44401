"""Issue 11, "what must be shown" 1: ten jobs through `tuneserve up` while a loop SIGKILLs the
worker (6 times), the API (2 times) and restarts Redis EMPTY (once), in a random order and at
random moments (seeded; the seed is printed). Every job succeeds, each adapter is published
exactly once, nothing is left half-written, and the supervisor's restarts are in its log.

`up` supervises the API and the worker; Redis is a dedicated redis-server of this test (up
uses it because it answers), so the test can restart it empty. The API runs without the
inference engine: these jobs need none, and its restarts stay quick. TUNESERVE_JOB_MAX_ATTEMPTS
is raised because one job may be hit by several of the kills (the attempt limit has its own
tests); everything else is as `System.env` deploys it."""
from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter

import httpx
import pytest
from e2e_harness import Client, System, jsonl_bytes, sample_rows, wait_for
from harness import Up, free_port, pid_alive

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

JOBS = 10
PLAN = ["worker"] * 6 + ["api"] * 2 + ["redis"]
STEPS = 60
TIMEOUT = 600  # every wait below is bounded by this (a loaded 2-core host is slow, never stuck)


def _hyper() -> dict:
    return dict(max_steps=STEPS, batch_size=2, learning_rate=1e-2, lr_scheduler="constant", logging_steps=1,
                checkpoint_steps=10, max_source_length=32, max_target_length=32, eval_max_samples=0)


def _retry(fn, what: str):
    """A request that may meet the API mid-restart: retried until it answers, within TIMEOUT."""
    last: list[str] = []

    def attempt():
        try:
            return fn() or True
        except (httpx.HTTPError, AssertionError) as exc:
            last[:] = [repr(exc)]
            return None
    return wait_for(attempt, TIMEOUT, what, interval=0.5, diagnostics=lambda: "last error: " + "".join(last))


def test_ten_jobs_survive_killed_workers_apis_and_an_empty_redis(tmp_path, demo_model, own_redis):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    plan = PLAN[:]
    rng.shuffle(plan)
    print(f"\nchaos seed {seed}: {plan}")

    port = free_port()
    system = System(root=tmp_path / "sys", redis_url=own_redis.url, base_model=demo_model,
                    overrides={"TUNESERVE_ENGINE_ENABLED": "false", "TUNESERVE_JOB_MAX_ATTEMPTS": "20",
                               "TUNESERVE_REQUEUE_GRACE_S": "2"})
    env = system.env(TUNESERVE_PORT=str(port), COLUMNS="200")
    system.root.mkdir(parents=True, exist_ok=True)
    up = Up.start(["--max-restarts", "10", "--restart-window", "30", "--restart-backoff", "0.2"], env,
                  system.root / "up.log", port)
    store = system.store()
    c = Client(up.url)
    try:
        up.wait_up("up started")
        base = c.http.get("/readyz").json()["base_model"]
        f = c.upload(jsonl_bytes(sample_rows(24)))
        jobs = [c.create_job(model=base, training_file=f["id"], suffix=f"chaos{i}", hyperparameters=_hyper())["id"]
                for i in range(JOBS)]

        def statuses() -> Counter:
            return Counter(store.get_job(j).status.value for j in jobs)

        hits: Counter = Counter()  # what each kill met: a job mid-training or not
        for target in plan:
            # Each fault lands on a system that is up again after the last one (else the kills
            # would only ever hit a process starting), at a random moment within 2 s.
            while True:
                up.wait_up(f"recovery before killing the {target}", timeout=TIMEOUT)
                if target == "worker":  # aim at a training job while there is work left
                    wait_for(lambda: statuses()["running"] or statuses()["queued"] == 0, TIMEOUT, "a job to run")
                time.sleep(rng.uniform(0, 2))  # the random moment (not a synchronisation)
                hits["mid-job" if statuses()["running"] else "idle"] += 1
                if target == "redis":
                    own_redis.kill()
                    own_redis.start()  # same port, no persistence: an EMPTY broker
                    break
                pid = up.current(target)
                try:
                    if pid is not None:
                        os.kill(pid, signal.SIGKILL)
                        break
                except ProcessLookupError:
                    pass
                # It exited by itself in the meantime (e.g. on the broker's restart): wait and retry.
            print(f"killed {target} ({dict(statuses())})")

        wait_for(lambda: statuses()["succeeded"] == JOBS or statuses()["failed"] or statuses()["cancelled"],
                 TIMEOUT, "all jobs to finish", interval=0.5,
                 diagnostics=lambda: f"{dict(statuses())}\n{up.log()[-6000:]}")
        done = [_retry(lambda j=j: c.job(j), f"job {j}") for j in jobs]
        assert [d["status"] for d in done] == ["succeeded"] * JOBS, [(d["id"], d["status"], d["error"]) for d in done]
        print(f"kills met: {dict(hits)}; runs per job: {[store.get_job(j).attempts for j in jobs]}")

        # Each adapter published exactly once: one version each, ten distinct names, nothing else.
        names = [d["fine_tuned_model"] for d in done]
        assert len(set(names)) == JOBS
        tenant_dir = system.registry_dir / "alice"
        assert sorted(p.name for p in tenant_dir.iterdir()) == sorted(names)
        for name in names:
            assert [p.name for p in (tenant_dir / name).iterdir()] == ["1"], name
        listed = _retry(lambda: c.http.get("/v1/adapters").raise_for_status().json()["data"], "adapters")
        assert sorted(a["name"] for a in listed) == sorted(names)
        # No half-written checkpoint, adapter or upload anywhere; no unpublished adapter copy.
        assert system.tmp_leftovers() == []
        assert not [j for j in jobs if (system.data_dir / "jobs" / j / "adapter").exists()]

        out = up.log()
        assert out.count("worker exited with code -9; restarting in") >= plan.count("worker"), out[-6000:]
        assert out.count("api exited with code -9; restarting in") == plan.count("api"), out[-6000:]
        assert "giving up" not in out
    finally:
        c.close()
        store.close()
        children = up.pids("worker") + up.pids("api")
        up.stop()
    assert up.proc.returncode == 0, up.log()[-4000:]
    assert not [p for p in children if pid_alive(p)]
