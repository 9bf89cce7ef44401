"""The Celery application of the training workers.

Run a worker with `celery -A workers.celery_app worker -Q training --pool=solo -c 1` (or
`tuneserve worker`). The app object is configuration only; importing this module imports
neither torch nor the training code (the task imports them when it first runs).

Delivery guarantees, and how a dead worker's job comes back
------------------------------------------------------------
* `task_acks_late`: the message is acknowledged when the task *returns*, so a worker that
  dies mid-job leaves its message unacknowledged. `worker_prefetch_multiplier=1`: a worker
  holds at most the message it is executing, so nothing waits behind a long training run.
* `task_reject_on_worker_lost`: with the prefork pool, a child killed mid-task (OOM killer,
  SIGKILL) gets its message requeued at once instead of acknowledged.
* With Redis there is no broker-side "consumer died" signal: an unacked message sits in the
  `unacked` hash and is pushed back onto the queue by any live worker once it is older than
  `visibility_timeout` (`TUNESERVE_BROKER_VISIBILITY_TIMEOUT_S`, default 1 h; the restore
  sweep runs every `unacked_restore_interval` seconds, set here from the timeout). A job that
  runs longer than the timeout is therefore delivered a second time while it still runs:
  that is harmless, because the task first claims the job in the store with a
  compare-and-set and a duplicate that finds the job `running` with a live heartbeat simply
  returns (see workers/tasks.py). Short timeouts give faster redelivery after a crash at the
  price of such duplicate deliveries; long ones rely on the reaper.
* Independently of the broker, the reaper (workers/reaper.py, a thread in every worker)
  requeues a `running` job whose heartbeat is older than `TUNESERVE_HEARTBEAT_TIMEOUT_S`, or
  fails it with `worker_lost` after `TUNESERVE_JOB_MAX_ATTEMPTS` runs, and re-sends `queued`
  jobs the broker lost (Redis restarted empty): the store, not the broker, is the truth.
  Either path resumes the job from its last checkpoint in `<data_dir>/jobs/<job_id>`.
* No result backend: results and progress live in the store (`task_ignore_result`).
"""
from __future__ import annotations

import logging

from celery import Celery, signals

from service.core.config import Settings, get_settings
from service.core.tasks import TRAIN_TASK
from service.core.tasks import send_train as _send_train

log = logging.getLogger("tuneserve.worker")



def transport_options(settings: Settings) -> dict:
    vt = max(1.0, float(settings.broker_visibility_timeout_s))
    return {
        "visibility_timeout": vt,
        # Sweep for expired unacked messages a few times per timeout (kombu's default is
        # every ~100 s whatever the timeout), at most every 10 s, at least every 1 s.
        "unacked_restore_interval": max(1, min(10, int(vt / 4))),
        "unacked_restore_throttle": 1,
        # The restore sweep holds a Redis lock; one left by a worker killed mid-sweep would
        # block every redelivery until it expires (kombu's default: 300 s).
        "unacked_mutex_expire": int(max(5, min(300, vt))),
        # A Redis that vanishes without closing the socket must not hang a publish forever.
        "socket_timeout": 30.0,
        "socket_connect_timeout": 5.0,
    }


def make_celery(settings: Settings | None = None, *, name: str = "tuneserve") -> Celery:
    settings = settings or get_settings()
    app = Celery(name, broker=settings.redis_url, include=["workers.tasks"])
    app.conf.update(
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,  # failures are recorded in the store, not retried blindly
        task_default_queue=settings.task_queue,
        task_routes={TRAIN_TASK: {"queue": settings.task_queue}},
        task_ignore_result=True,
        result_backend=None,
        task_serializer="json",
        accept_content=["json"],
        broker_transport_options=transport_options(settings),
        broker_connection_retry_on_startup=True,
        broker_connection_retry=True,
        broker_connection_max_retries=None,  # a restarting Redis is waited for, not fatal
        # One job per prefork child: a fresh process frees all GPU memory between jobs.
        worker_max_tasks_per_child=1,
        worker_send_task_events=False,
        worker_hijack_root_logger=False,
        task_publish_retry_policy={"max_retries": 5, "interval_start": 0.2,
                                   "interval_step": 0.5, "interval_max": 2.0},
    )
    # The settings the app was built from, for the reaper started with the worker.
    app.tuneserve_settings = settings  # type: ignore[attr-defined]
    return app


def send_train(app: Celery, settings: Settings, job_id: str) -> None:
    """Send train(job_id) on this worker's queue (service.core.tasks, as the API sends it)."""
    _send_train(app, settings.task_queue, job_id)


# --- the reaper thread lives and dies with the worker ------------------------------------
@signals.worker_ready.connect
def _start_reaper(sender=None, **_kw) -> None:
    app = getattr(sender, "app", None)
    settings = getattr(app, "tuneserve_settings", None) or get_settings()
    if settings.reaper_interval_s <= 0:
        log.info("reaper disabled (TUNESERVE_REAPER_INTERVAL_S <= 0)")
        return
    from workers.reaper import ReaperThread

    thread = ReaperThread(app, settings)
    thread.start()
    if app is not None:
        app.tuneserve_reaper = thread  # type: ignore[attr-defined]


@signals.worker_ready.connect
def _start_webhooks(sender=None, **_kw) -> None:
    # The webhook outbox's sender (workers/webhooks.py): one more daemon thread per worker.
    app = getattr(sender, "app", None)
    settings = getattr(app, "tuneserve_settings", None) or get_settings()
    from workers.webhooks import WebhookThread

    thread = WebhookThread(settings)
    thread.start()
    if app is not None:
        app.tuneserve_webhooks = thread  # type: ignore[attr-defined]


@signals.worker_shutdown.connect
def _stop_reaper(sender=None, **_kw) -> None:
    app = getattr(sender, "app", None)
    for name in ("tuneserve_reaper", "tuneserve_webhooks"):
        thread = getattr(app, name, None)
        if thread is not None:
            thread.stop()


# Module-level app for the `celery -A workers.celery_app worker` CLI (configuration, no model state).
celery_app = make_celery()
app = celery_app
