"""Object ids: `<prefix>-<24 hex>` (96 random bits), like OpenAI's `ftjob-…` / `file-…`."""
from __future__ import annotations

import secrets

FILE_PREFIX = "file"
JOB_PREFIX = "ftjob"
EVENT_PREFIX = "ftevent"
API_KEY_PREFIX = "key"
WEBHOOK_ENDPOINT_PREFIX = "whep"


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def file_id() -> str:
    return new_id(FILE_PREFIX)


def job_id() -> str:
    return new_id(JOB_PREFIX)


def event_id() -> str:
    return new_id(EVENT_PREFIX)
