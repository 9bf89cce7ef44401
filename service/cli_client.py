"""The HTTP side of the `tuneserve` CLI: a thin httpx client for tuneserve's own API.

Client commands go through the API (never the store), so they work against a remote
deployment exactly as against `make run`. Tests inject an httpx.Client (e.g. FastAPI's
TestClient) through the typer context object: `runner.invoke(app, args, obj={"http": client})`.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
API_KEY_FILE = "api_key"  # under TUNESERVE_DATA_DIR; written by `tuneserve up`


class CliError(Exception):
    """An error to show the user (one line) before exiting with `exit_code`."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def data_dir() -> Path:
    """TUNESERVE_DATA_DIR without building Settings: a client command must not fail on
    server-side settings (e.g. a non-local TUNESERVE_HOST without keys)."""
    return Path(os.environ.get("TUNESERVE_DATA_DIR") or ".tuneserve")


def saved_api_key_path() -> Path:
    return data_dir() / API_KEY_FILE


def resolve_api_key(explicit: str | None) -> str | None:
    """--api-key / TUNESERVE_API_KEY, else the key `tuneserve up` saved for tenant "default"."""
    if explicit:
        return explicit
    path = saved_api_key_path()
    try:
        key = path.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return key or None


def _error_message(response: httpx.Response) -> str:
    """OpenAI-shaped {"error": {...}} bodies become one readable line (with every detail)."""
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip()
        return f"HTTP {response.status_code}: {text[:500] or response.reason_phrase}"
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        message = str(err.get("message") or err.get("code") or "error")
        if err.get("param") and str(err["param"]) not in message:
            message += f" (param: {err['param']})"
        return f"HTTP {response.status_code}: {message}"
    if isinstance(body, dict) and "detail" in body:  # FastAPI's default shape, just in case
        return f"HTTP {response.status_code}: {json.dumps(body['detail'], ensure_ascii=False)}"
    return f"HTTP {response.status_code}: {json.dumps(body, ensure_ascii=False)[:500]}"


class ApiClient:
    def __init__(self, url: str, api_key: str | None, *, http: httpx.Client | None = None,
                 timeout: float = 60.0):
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        if http is not None:
            http.headers.update(headers)
            self._http = http
            self._owned = False
        else:
            # No read timeout on streams (a long generation), but fail fast on connect.
            self._http = httpx.Client(base_url=self.url, headers=headers,
                                      timeout=httpx.Timeout(timeout, connect=5.0))
            self._owned = True

    def close(self) -> None:
        if self._owned:
            self._http.close()

    def __enter__(self) -> "ApiClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.ConnectError as exc:
            raise CliError(f"cannot reach {self.url} ({exc}); is `tuneserve up` (or `make run`) running? "
                           "Set --url / TUNESERVE_URL for another server.", exit_code=2) from exc
        except httpx.TimeoutException as exc:
            raise CliError(f"{method} {path}: timed out ({exc})", exit_code=2) from exc
        if response.status_code == 401:
            raise CliError(f"{_error_message(response)}. Pass --api-key or set TUNESERVE_API_KEY "
                           f"(`tuneserve up` saves one in {saved_api_key_path()}).", exit_code=1)
        if response.status_code >= 400:
            raise CliError(_error_message(response))
        return response

    def get(self, path: str, **params: Any) -> Any:
        return self._send("GET", path, params={k: v for k, v in params.items() if v is not None}).json()

    def post(self, path: str, json_body: Any = None, **kwargs: Any) -> Any:
        if json_body is not None:
            kwargs["json"] = json_body
        return self._send("POST", path, **kwargs).json()

    def download(self, path: str, params: dict[str, Any] | None = None) -> bytes:
        return self._send("GET", path, params=params or {}).content

    def upload_file(self, path: Path, purpose: str = "fine-tune") -> dict[str, Any]:
        with path.open("rb") as f:
            return self.post("/v1/files", data={"purpose": purpose},
                             files={"file": (path.name, f, "application/jsonl")})

    def stream_sse(self, path: str, json_body: Any) -> Iterator[dict[str, Any]]:
        """Yield each `data:` JSON payload of a server-sent event stream until `[DONE]`."""
        try:
            with self._http.stream("POST", path, json=json_body,
                                   timeout=httpx.Timeout(None, connect=5.0)) as response:
                if response.status_code >= 400:
                    response.read()
                    raise CliError(_error_message(response))
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    payload = json.loads(data)
                    if isinstance(payload, dict) and "error" in payload:
                        err = payload["error"]
                        raise CliError(f"stream error: {err.get('message', err) if isinstance(err, dict) else err}")
                    yield payload
        except httpx.ConnectError as exc:
            raise CliError(f"cannot reach {self.url} ({exc}); is `tuneserve up` running?", exit_code=2) from exc

    # -- helpers shared by several commands ------------------------------------------------
    def default_base_model(self) -> str:
        """The base model's id from /v1/models (the entry of kind "base")."""
        models = self.get("/v1/models").get("data", [])
        for m in models:
            if m.get("kind") == "base":
                return m["id"]
        if models:
            return models[0]["id"]
        raise CliError("the server lists no models (GET /v1/models is empty)")
