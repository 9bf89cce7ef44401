"""service/core/webhooks.py: signatures the `openai` SDK's verifier accepts, and the target-URL
policy (no network: resolution is injected)."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import openai
import pytest
from openai import OpenAI

from service.core import webhooks as wh
from service.core.domain import WebhookEventType
from service.core.errors import InvalidInput


def _verifier() -> OpenAI:
    return OpenAI(api_key="unused", base_url="http://127.0.0.1:9/v1")


def test_signature_is_standard_webhooks_and_the_sdk_accepts_it():
    secret = wh.new_secret()
    assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) == 32
    body = wh.event_body("evt_1", WebhookEventType.fine_tuning_job_succeeded, 1700000000, "ftjob-1")
    ts = int(time.time())
    headers = wh.signed_headers([secret], "msg_1", ts, body)
    mac = hmac.new(base64.b64decode(secret[6:]), f"msg_1.{ts}.{body}".encode(), hashlib.sha256).digest()
    assert headers == {"webhook-id": "msg_1", "webhook-timestamp": str(ts),
                       "webhook-signature": "v1," + base64.b64encode(mac).decode()}
    event = _verifier().webhooks.unwrap(body, headers, secret=secret)
    assert (event.type, event.data.id, event.created_at) == ("fine_tuning.job.succeeded", "ftjob-1", 1700000000)
    assert json.loads(body)["object"] == "event"
    with pytest.raises(openai.InvalidWebhookSignatureError):
        _verifier().webhooks.unwrap(body.replace("ftjob-1", "ftjob-2"), headers, secret=secret)


def test_two_secrets_sign_side_by_side():
    new, old = wh.new_secret(), wh.new_secret()
    body = wh.event_body("evt_1", WebhookEventType.fine_tuning_job_failed, 1, "ftjob-1")
    headers = wh.signed_headers([new, old], "msg_1", int(time.time()), body)
    for secret in (new, old):
        _verifier().webhooks.verify_signature(body, headers, secret=secret)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        _verifier().webhooks.verify_signature(body, headers, secret=wh.new_secret())


def test_hint_shows_only_the_tail():
    secret = wh.new_secret()
    assert wh.secret_hint(secret).endswith(secret[-4:]) and secret[6:-4] not in wh.secret_hint(secret)


def _resolver(table):
    def resolve(host):
        if host not in table:
            raise OSError("no such host")
        return table[host]
    return resolve


@pytest.mark.parametrize("url, addresses", [
    ("http://127.0.0.1/", None), ("http://10.0.0.5:8080/x", None), ("http://192.168.1.1/", None),
    ("http://172.16.0.1/", None), ("http://169.254.169.254/", None), ("http://100.64.0.1/", None),
    ("http://0.0.0.0/", None), ("http://[::1]/", None), ("http://[fe80::1]/", None), ("http://[fd00::1]/", None),
    ("http://[::ffff:10.0.0.1]/", None), ("http://224.0.0.1/", None),
    ("https://internal.example/", ["10.1.1.1"]), ("https://mixed.example/", ["93.184.215.14", "127.0.0.1"]),
])
def test_private_targets_are_refused_unless_allowed(url, addresses):
    resolve = _resolver({url.split("//")[1].split("/")[0]: addresses or []})
    with pytest.raises(InvalidInput) as e:
        wh.check_target_url(url, allow_private=False, resolve=resolve)
    assert e.value.param == "url" and e.value.code == "url_not_allowed"
    assert wh.check_target_url(url, allow_private=True, resolve=resolve) == url


def test_public_targets_pass_and_bad_shapes_are_refused():
    resolve = _resolver({"hooks.example": ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"]})
    assert wh.check_target_url("https://hooks.example/h", allow_private=False, resolve=resolve)
    assert wh.check_target_url("https://93.184.215.14/h", allow_private=False, resolve=resolve)
    with pytest.raises(InvalidInput, match="does not resolve"):
        wh.check_target_url("https://nowhere.example/", allow_private=False, resolve=resolve)
    for bad in ("ftp://hooks.example/", "hooks.example/h", "http:///path", "https://u:p@hooks.example/",
                "http://hooks.example:99999/", "http://hooks.example/a b", "http://hooks.example/\x00", "https://h.example/" + "a" * 3000):
        with pytest.raises(InvalidInput) as e:
            wh.check_target_url(bad, allow_private=True, resolve=resolve)
        assert e.value.param == "url"
