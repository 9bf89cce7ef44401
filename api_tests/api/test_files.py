"""POST/GET/DELETE /v1/files: good uploads of the three formats, and a corpus of malformed
uploads that must each answer 4xx naming the line and field with NOTHING written: no file
(not even a temp file) under files_dir, no row, nothing on the broker queue."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app

from .conftest import (AUTH_A, AUTH_B, GOOD_ROWS, assert_error, files_on_disk, jsonl, upload,
                       upload_ok)

ADVERTISEGEN = GOOD_ROWS
CHATGLM3 = [{"conversations": [{"role": "system", "content": "你是广告文案助手"},
                               {"role": "user", "content": "类型#上衣"},
                               {"role": "assistant", "content": "一件好看的上衣"}]}] * 3
OPENAI = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 4


@pytest.mark.parametrize("rows,fmt", [(ADVERTISEGEN, "advertisegen"), (CHATGLM3, "chatglm3"), (OPENAI, "openai")])
def test_upload_each_format(client, settings, rows, fmt, queue_len):
    r = upload(client, jsonl(rows))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "file" and body["id"].startswith("file-")
    assert body["purpose"] == "fine-tune" and body["status"] == "processed"
    assert body["format"] == fmt and body["rows"] == len(rows) and body["bytes"] == len(jsonl(rows))
    assert isinstance(body["created_at"], int)
    assert "path" not in body and "tenant" not in body  # internal fields never leak
    on_disk = files_on_disk(settings)
    assert len(on_disk) == 1 and on_disk[0].read_bytes() == jsonl(rows)
    assert not [p for p in on_disk if p.name.startswith(".upload-")]
    assert queue_len() == 0


def test_list_get_content_delete(client, settings):
    a = upload_ok(client)
    b = upload_ok(client, OPENAI)
    listed = client.get("/v1/files", headers=AUTH_A).json()
    assert listed["object"] == "list" and [f["id"] for f in listed["data"]] == [b, a]
    page = client.get("/v1/files", headers=AUTH_A, params={"limit": 1}).json()
    assert [f["id"] for f in page["data"]] == [b] and page["has_more"] is True
    page2 = client.get("/v1/files", headers=AUTH_A, params={"limit": 1, "after": b}).json()
    assert [f["id"] for f in page2["data"]] == [a] and page2["has_more"] is False
    assert client.get(f"/v1/files/{a}", headers=AUTH_A).json()["id"] == a
    content = client.get(f"/v1/files/{a}/content", headers=AUTH_A)
    assert content.status_code == 200 and content.content == jsonl(GOOD_ROWS)
    r = client.delete(f"/v1/files/{a}", headers=AUTH_A)
    assert r.status_code == 200 and r.json() == {"id": a, "object": "file", "deleted": True}
    assert_error(client.get(f"/v1/files/{a}", headers=AUTH_A), 404)
    assert len(files_on_disk(settings)) == 1  # b's bytes only


def test_cross_tenant_files_are_404(client):
    a = upload_ok(client)
    assert_error(client.get(f"/v1/files/{a}", headers=AUTH_B), 404, code="not_found")
    assert_error(client.get(f"/v1/files/{a}/content", headers=AUTH_B), 404)
    assert_error(client.delete(f"/v1/files/{a}", headers=AUTH_B), 404)
    assert client.get("/v1/files", headers=AUTH_B).json()["data"] == []
    assert client.get(f"/v1/files/{a}", headers=AUTH_A).status_code == 200  # still there


def _deep(depth: int) -> dict:
    v: object = "x"
    for _ in range(depth):
        v = {"k": v}
    return {"content": "a", "summary": "b", "extra": v}


ok = json.dumps(GOOD_ROWS[0], ensure_ascii=False).encode()
# (name, body, expected line, field (substring) or None) -- every one is refused with 400.
MALFORMED = [
    ("not json", ok + b"\n{not json}\n", 2, ""),
    ("non utf-8", ok + b"\n" + b'{"content": "\xff\xfe", "summary": "x"}\n', 2, ""),
    ("array row", b'[1, 2]\n', 1, ""),
    ("unknown format", ok + b'\n{"prompt": "a", "completion": "b"}\n', 2, ""),
    ("missing summary", ok + b'\n' + ok + b'\n{"content": "only"}\n', 3, "summary"),
    ("empty summary", b'{"content": "a", "summary": "   "}\n', 1, "summary"),
    ("summary not a string", b'{"content": "a", "summary": 5}\n', 1, "summary"),
    ("mixed formats", ok + b"\n" + jsonl(OPENAI[:1]), 2, ""),
    ("bad role", jsonl([{"messages": [{"role": "wizard", "content": "x"},
                                      {"role": "assistant", "content": "y"}]}]), 1, "messages[0].role"),
    ("no assistant turn", jsonl([{"conversations": [{"role": "user", "content": "x"}]}]), 1, "conversations"),
    ("last turn not assistant", jsonl([{"messages": [{"role": "user", "content": "x"},
                                                     {"role": "assistant", "content": "y"},
                                                     {"role": "user", "content": "z"}]}]), 1, "messages"),
    ("content not a string", jsonl([{"messages": [{"role": "user", "content": ["x"]},
                                                  {"role": "assistant", "content": "y"}]}]), 1,
     "messages[0].content"),
    ("deeply nested", ok + b"\n" + json.dumps(_deep(40)).encode() + b"\n", 2, ""),
    ("NaN constant", b'{"content": "a", "summary": NaN}\n', 1, ""),
    ("huge line", ok + b'\n{"content": "' + b"x" * 9000 + b'", "summary": "b"}\n', 2, ""),
    ("lone surrogate escape", ok + b'\n{"content": "a\\ud800b", "summary": "x"}\n', 2, "content"),
    ("lone surrogate in a chat turn", jsonl([{"messages": [{"role": "user", "content": "x"}, {
        "role": "assistant", "content": "y"}]}]) + b'{"messages": [{"role": "user", "content": "ok"}, '
                                                    b'{"role": "assistant", "content": "\\udc00"}]}\n',
     2, "messages[1].content"),
    ("empty file", b"", None, ""),
    ("only blank lines", b"\n\n  \n", None, ""),
]


@pytest.mark.parametrize("name,body,line,field", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_dataset_refused_nothing_written(client, settings, queue_len, name, body, line, field):
    r = upload(client, body)
    err = assert_error(r, 400, param="file")
    detail = err["details"][0]
    if line is None:  # nothing to point at: the whole file is empty
        assert "no rows" in err["message"]
    else:
        assert f"line {line}" in err["message"], err
        assert detail["line"] == line
    if field:
        assert field in detail["field"], detail
    assert files_on_disk(settings) == [], "nothing may be written for a refused upload"
    assert client.get("/v1/files", headers=AUTH_A).json()["data"] == []
    assert queue_len() == 0


def test_bad_lines_reported_first_twenty_with_the_count(client, settings, queue_len):
    """Issue 14 part 5: not only the first bad line: the first 20, in order, each with its line
    and field, and how many there are; nothing written."""
    good = json.dumps(GOOD_ROWS[0], ensure_ascii=False).encode()
    lines = []
    for i in range(1, 61):  # lines 3, 6, 9, ... are bad (20 of them by line 60), alternating kinds
        if i % 3:
            lines.append(good)
        else:
            lines.append(b'{"content": "a"}' if i % 2 else b"{not json")
    lines.append(b'{"content": "a", "summary": 5}')  # line 61: the 21st bad line, counted, not listed
    err = assert_error(upload(client, b"\n".join(lines) + b"\n"), 400, param="file")
    assert err["message"].startswith("21 lines are invalid: line 3: "), err["message"]
    assert [d["line"] for d in err["details"]] == list(range(3, 61, 3))
    assert [d["field"] for d in err["details"][:2]] == ["summary", ""]
    assert "not valid JSON" in err["details"][1]["message"]
    assert files_on_disk(settings) == [] and queue_len() == 0


HOSTILE_FORMS = [
    # (name, kwargs for upload(), status, param)
    ("purpose wrong", dict(purpose="assistants"), 400, "purpose"),
    ("purpose missing", dict(purpose=None), 400, "purpose"),
    ("filename with ..", dict(filename="../../etc/passwd"), 400, "file"),
    ("filename with slash", dict(filename="a/b.jsonl"), 400, "file"),
    ("filename with bidi override", dict(filename="evil\u202egnp.jsonl"), 400, "file"),
    ("filename with zero-width", dict(filename="a\u200bb.jsonl"), 400, "file"),
    ("filename fullwidth look-alike", dict(filename="ａ.jsonl"), 400, "file"),
]


@pytest.mark.parametrize("name,kw,status,param", HOSTILE_FORMS, ids=[h[0] for h in HOSTILE_FORMS])
def test_hostile_form_refused_nothing_written(client, settings, queue_len, name, kw, status, param):
    r = upload(client, jsonl(GOOD_ROWS), **kw)
    assert_error(r, status, param=param)
    assert files_on_disk(settings) == []
    assert client.get("/v1/files", headers=AUTH_A).json()["data"] == []
    assert queue_len() == 0


def test_too_large_refused_while_streaming(client, settings):
    # 64 KiB limit (conftest); a chunked body of ~160 KiB with no Content-Length.
    row = json.dumps({"content": "x" * 1000, "summary": "y"}).encode() + b"\n"
    boundary = "tsboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n"
            "Content-Type: application/jsonl\r\n\r\n").encode()
    sent = []

    def body():
        yield head
        for _ in range(160):
            sent.append(1)
            yield row
        yield f"\r\n--{boundary}--\r\n".encode()

    r = client.post("/v1/files", headers={**AUTH_A, "Content-Type": f"multipart/form-data; boundary={boundary}"},
                    content=body())
    assert_error(r, 413, param="file", code="payload_too_large")
    assert files_on_disk(settings) == []


def test_declared_content_length_over_limit_refused_up_front(client, settings):
    r = upload(client, b"x" * (200 * 1024))
    assert_error(r, 413, code="payload_too_large")
    assert files_on_disk(settings) == []


def test_too_many_rows(make_settings, settings):
    from fastapi.testclient import TestClient
    from service.api.app import create_app
    with TestClient(create_app(make_settings(max_upload_rows=3))) as c:
        assert_error(upload(c, jsonl(GOOD_ROWS)), 413, code="payload_too_large")
        assert files_on_disk(settings) == []


def test_not_multipart_and_broken_multipart(client, settings):
    assert_error(client.post("/v1/files", headers=AUTH_A, json={"file": "x"}), 400, param="file")
    truncated = (b"--b\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
                 b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jsonl\"\r\n\r\n" + ok + b"\n")
    r = client.post("/v1/files", headers={**AUTH_A, "Content-Type": "multipart/form-data; boundary=b"},
                    content=truncated)
    assert_error(r, 400, param="file")
    r = client.post("/v1/files", headers={**AUTH_A, "Content-Type": "multipart/form-data"}, content=b"x")
    assert_error(r, 400, param="file")
    assert files_on_disk(settings) == []
    assert client.get("/v1/files", headers=AUTH_A).json()["data"] == []


def test_two_file_parts_refused(client, settings):
    r = client.post("/v1/files", headers=AUTH_A, data={"purpose": "fine-tune"},
                    files=[("file", ("a.jsonl", jsonl(GOOD_ROWS))), ("file", ("b.jsonl", jsonl(GOOD_ROWS)))])
    assert_error(r, 400, param="file")
    assert files_on_disk(settings) == []


def raw_multipart(file_header_filename: bytes, data: bytes, boundary: bytes = b"rawb") -> tuple[dict, bytes]:
    body = (b"--" + boundary + b"\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
            b"--" + boundary + b"\r\nContent-Disposition: form-data; name=\"file\"; filename=\"" + file_header_filename
            + b"\"\r\n\r\n" + data + b"\r\n--" + boundary + b"--\r\n")
    return {**AUTH_A, "Content-Type": "multipart/form-data; boundary=" + boundary.decode()}, body


@pytest.mark.parametrize("fname", [b"a\x00.jsonl", b"\xff\xfe.jsonl", b"a\x1b[31m.jsonl"],
                         ids=["NUL", "non-utf8", "escape"])
def test_raw_hostile_filenames(client, settings, fname):
    # httpx would percent-escape these; send the bytes as a hostile client would.
    headers, body = raw_multipart(fname, jsonl(GOOD_ROWS))
    assert_error(client.post("/v1/files", headers=headers, content=body), 400, param="file")
    assert files_on_disk(settings) == []
    headers, body = raw_multipart(b"fine.jsonl", jsonl(GOOD_ROWS))
    assert client.post("/v1/files", headers=headers, content=body).status_code == 200  # the framing is right


def test_stale_half_uploads_are_removed_at_start(make_settings):
    """An API killed mid-upload (SIGKILL: no `finally` ran) leaves its `.upload-*.part`. The next
    start removes those older than a minute whose lock no live upload holds, and only those."""
    import fcntl
    import os
    import time as _time

    from service.api.uploads import PART_MIN_AGE_S

    settings = make_settings()
    files_dir = settings.files_dir
    files_dir.mkdir(parents=True)
    old = _time.time() - PART_MIN_AGE_S - 5

    def part(name: str, age: float | None) -> Path:
        p = files_dir / f".upload-{name}.part"
        p.write_bytes(b"half a row")
        if age is not None:
            os.utime(p, (age, age))
        return p

    dead = part("dead", old)
    fresh = part("fresh", None)          # just created: its upload may not hold the lock yet
    live = part("live", old)             # an old but live (slow) upload of another process
    holder = open(live, "rb")
    fcntl.flock(holder.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    published = files_dir / "0123abcd.jsonl"
    published.write_bytes(b"{}\n")
    os.utime(published, (old, old))
    try:
        with TestClient(create_app(settings)) as c:
            assert c.get("/healthz").status_code == 200
            assert not dead.exists()
            assert fresh.exists() and live.exists() and published.exists()
    finally:
        holder.close()


def test_an_upload_in_progress_holds_its_lock(client, settings):
    """What the startup sweep relies on: a live upload's .part is locked by its process."""
    import fcntl

    from service.api.uploads import _FileSink

    sink = _FileSink(settings, settings.files_dir)
    try:
        with open(sink.tmp, "rb") as other:
            with pytest.raises(BlockingIOError):
                fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        sink.discard()
    assert not sink.tmp.exists()
