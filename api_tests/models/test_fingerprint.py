"""The base-model fingerprint shared by trainer (manifest) and engine (refusal of mismatches)."""
import shutil

from service.models import base_model_fingerprint, resolve_base_model

FIXTURE = "api_tests/fixtures/chatglm3-tiny"


def test_fingerprint_stable_and_sensitive(tmp_path):
    converted = resolve_base_model(FIXTURE, tmp_path / "cache")
    first = base_model_fingerprint(converted)
    assert first and first == base_model_fingerprint(converted)
    other = tmp_path / "other"
    shutil.copytree(converted, other)
    cfg = (other / "config.json").read_text().replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": 2e-05')
    assert cfg != (other / "config.json").read_text()
    (other / "config.json").write_text(cfg)
    assert base_model_fingerprint(other) != first


def test_fingerprint_none_for_hub_id():
    assert base_model_fingerprint("THUDM/chatglm3-6b") is None
