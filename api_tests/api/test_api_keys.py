"""/v1/api_keys (ours): a tenant lists its keys by prefix, creates one (the whole key shown
only then) and revokes one; another tenant's keys are invisible and answer 404."""
from __future__ import annotations

from .conftest import AUTH_A, AUTH_B, KEY_A, assert_error


def test_list_create_use_and_revoke(client):
    listed = client.get("/v1/api_keys", headers=AUTH_A).json()
    assert listed["object"] == "list"
    assert [k["prefix"] for k in listed["data"]] == [KEY_A[:len(listed["data"][0]["prefix"])]]
    assert all("key" not in k for k in listed["data"])

    r = client.post("/v1/api_keys", headers=AUTH_A, json={"name": "ci"})
    assert r.status_code == 200, r.text
    new = r.json()
    assert new["object"] == "api_key" and new["name"] == "ci" and new["key"].startswith(new["prefix"])
    mine = {"Authorization": f"Bearer {new['key']}"}
    assert client.get("/v1/models", headers=mine).status_code == 200
    ids = [k["id"] for k in client.get("/v1/api_keys", headers=AUTH_A).json()["data"]]
    assert new["id"] in ids and new["id"] not in [k["id"] for k in client.get("/v1/api_keys", headers=AUTH_B).json()["data"]]

    assert_error(client.delete(f"/v1/api_keys/{new['id']}", headers=AUTH_B), 404)  # not bob's
    assert client.get("/v1/models", headers=mine).status_code == 200
    revoked = client.delete(f"/v1/api_keys/{new['id']}", headers=AUTH_A).json()
    assert revoked["revoked_at"] is not None
    assert client.get("/v1/models", headers=mine).status_code == 401
    assert client.post("/v1/api_keys", headers=AUTH_A).json()["name"] is None  # no body: unnamed
    assert_error(client.post("/v1/api_keys", headers=AUTH_A, json={"nmae": "x"}), 400)
