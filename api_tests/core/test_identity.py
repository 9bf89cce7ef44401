"""service.core.identity: one naming rule for the base model, used by the launcher, API,
engine and worker (and the manifest, which records the public id, not a host path)."""
from __future__ import annotations

from service.core.config import CHATGLM3_HUB_ID, DEMO_MODEL_NAME, Settings
from service.core.domain import BASE_ADAPTER
from service.core.identity import BaseModelIdentity, chosen_ref, demo_dir, load_ref, public_id


def test_public_id_rule(tmp_path):
    s = Settings(data_dir=tmp_path)
    local = tmp_path / "my-base"
    local.mkdir()
    assert public_id(CHATGLM3_HUB_ID, s) == CHATGLM3_HUB_ID
    assert public_id(str(local), s) == "my-base"
    assert public_id(str(demo_dir(s)), s) == public_id("", s) == public_id(DEMO_MODEL_NAME, s) == DEMO_MODEL_NAME


def test_chosen_and_loaded_refs(tmp_path):
    s = Settings(data_dir=tmp_path)
    assert chosen_ref(s, has_cuda=True) == CHATGLM3_HUB_ID
    assert chosen_ref(s, has_cuda=False) == str(demo_dir(s))
    assert load_ref(DEMO_MODEL_NAME, s) == str(demo_dir(s)) and load_ref(CHATGLM3_HUB_ID, s) == CHATGLM3_HUB_ID
    pinned = Settings(data_dir=tmp_path, base_model="/models/x")
    assert chosen_ref(pinned, has_cuda=True) == load_ref(DEMO_MODEL_NAME, pinned) == "/models/x"


def test_is_base_accepts_every_spelling_once(tmp_path):
    local = tmp_path / "my-base"
    local.mkdir()
    s = Settings(data_dir=tmp_path, base_model=str(local))
    ident = BaseModelIdentity.of(str(local), s)
    assert ident.public_id == "my-base" and ident.aliases == frozenset({str(local)})
    assert all(ident.is_base(n) for n in ("my-base", str(local), BASE_ADAPTER, None, ""))
    assert not ident.is_base("ft-ads-123")



def test_one_device_rule():
    """The engine and the trainer both use device_for (through service.models.resolve_device)."""
    import pytest

    from service.core.errors import InvalidInput
    from service.core.identity import device_for

    assert device_for("auto", has_cuda=True) == device_for("", has_cuda=True) == device_for(None, has_cuda=True) == "cuda:0"
    assert device_for("auto", has_cuda=False) == device_for("cpu", has_cuda=True) == "cpu"
    assert device_for("cuda", has_cuda=True) == "cuda:0" and device_for("cuda:1", has_cuda=True) == "cuda:1"
    for bad, has_cuda in (("cuda", False), ("cuda:0", False), ("tpu", True), ("cuda:x", True)):
        with pytest.raises(InvalidInput) as e:
            device_for(bad, has_cuda=has_cuda)
        assert e.value.param == "device"
    with pytest.raises(InvalidInput, match="CUDA is not available"):
        device_for("cuda", has_cuda=False)
