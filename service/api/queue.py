"""The API's side of the broker: send the training task by NAME (so the API process never
imports torch or workers.tasks), probe the broker, and read queue depth for /metrics."""
from __future__ import annotations

import logging

from celery import Celery

from service.core.config import Settings
from service.core.errors import ServiceUnavailable
from service.core.tasks import send_train

log = logging.getLogger("tuneserve.api.queue")



class JobQueue:
    def __init__(self, settings: Settings):
        self.queue_name = settings.task_queue
        self.redis_url = settings.redis_url
        self._celery = Celery("tuneserve-api", broker=settings.redis_url, set_as_current=False)
        self._celery.conf.update(
            # Fail fast: a dead broker must answer the client with 503 within ~a second,
            # not hang the request while kombu retries forever.
            broker_connection_timeout=2.0,
            broker_connection_retry_on_startup=False,
            broker_transport_options={"socket_connect_timeout": 2.0, "socket_timeout": 5.0,
                                      "max_retries": 1},
            task_publish_retry_policy={"max_retries": 2, "interval_start": 0,
                                       "interval_step": 0.2, "interval_max": 0.5},
        )
        self._redis = None

    def enqueue(self, job_id: str) -> None:
        """Send train(job_id). Raises ServiceUnavailable when the broker does not take it."""
        try:
            send_train(self._celery, self.queue_name, job_id)
        except Exception as exc:  # kombu/redis raise a zoo of types for "broker unreachable"
            log.warning("could not enqueue %s: %s", job_id, exc)
            raise ServiceUnavailable("the job queue is unavailable; retry later",
                                     code="queue_unavailable") from exc

    # Broker probes use redis-py directly: cheap, bounded by short timeouts.
    def _client(self):
        if self._redis is None:
            import redis
            self._redis = redis.Redis.from_url(self.redis_url, socket_connect_timeout=1.0, socket_timeout=1.0)
        return self._redis

    def ping(self) -> bool:
        try:
            return bool(self._client().ping())
        except Exception:
            return False

    def depth(self) -> int | None:
        """Messages waiting in the training queue (kombu's redis transport keeps a list named
        after the queue), or None when the broker is unreachable."""
        try:
            return int(self._client().llen(self.queue_name))
        except Exception:
            return None

    def close(self) -> None:
        try:
            self._celery.close()
        except Exception:  # pragma: no cover
            pass
        if self._redis is not None:
            try:
                self._redis.close()
            except Exception:  # pragma: no cover
                pass
