"""Adapter registry: layout, atomic publish, sha256 verification, strict names."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import service.core.registry as registry_mod
from service.core.errors import IntegrityError, InvalidInput, NotFound
from service.core.registry import AdapterRegistry


def _manifest(**kw) -> dict:
    m = dict(base_model="chatglm3-tiny", target_modules=["query_key_value"], r=4, lora_alpha=16.0,
             job_id="ftjob-000000000000000000000001", training={"steps": 2}, metrics={"bleu-4": 1.0})
    m.update(kw)
    return m


@pytest.fixture
def reg(tmp_path) -> AdapterRegistry:
    return AdapterRegistry(tmp_path / "adapters")


@pytest.fixture
def src(tmp_path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"r": 4, "peft_type": "LORA"}))
    (d / "adapter_model.safetensors").write_bytes(os.urandom(4096))
    (d / "training_args.bin").write_bytes(b"not copied")
    return d


def _tmp_dirs(root: Path) -> list[Path]:
    return [p for p in root.rglob(".tmp-*")]


def test_publish_layout_and_manifest(reg: AdapterRegistry, src: Path):
    m = reg.publish(tenant="acme", name="ft-ads", source_dir=src, manifest=_manifest())
    assert (m.tenant, m.name, m.version) == ("acme", "ft-ads", 1)
    vdir = reg.root / "acme" / "ft-ads" / "1"
    assert sorted(p.name for p in vdir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                      "manifest.json"]
    on_disk = json.loads((vdir / "manifest.json").read_text())
    assert on_disk["version"] == 1 and on_disk["base_model"] == "chatglm3-tiny"
    assert set(m.files) == {"adapter_config.json", "adapter_model.safetensors"}
    assert m.files["adapter_model.safetensors"] == registry_mod.sha256_file(src / "adapter_model.safetensors")
    path, got = reg.resolve("acme", "ft-ads")
    assert path == vdir and got == m
    reg.verify(path, got)
    assert _tmp_dirs(reg.root) == []


def test_versions_increment_and_resolve(reg: AdapterRegistry, src: Path):
    assert reg.latest_version("acme", "a") is None
    for expected in (1, 2, 3):
        (src / "adapter_model.safetensors").write_bytes(os.urandom(64))
        assert reg.publish(tenant="acme", name="a", source_dir=src, manifest=_manifest()).version == expected
    assert reg.latest_version("acme", "a") == 3
    assert reg.resolve("acme", "a")[1].version == 3
    assert reg.resolve("acme", "a", 2)[1].version == 2
    assert [m.version for m in reg.list_versions("acme", "a")] == [1, 2, 3]
    with pytest.raises(NotFound):
        reg.resolve("acme", "a", 4)
    with pytest.raises(NotFound):
        reg.resolve("acme", "missing")
    # "10" sorts after "9" numerically, not as text
    for v in range(4, 11):
        reg.publish(tenant="acme", name="a", source_dir=src, manifest=_manifest())
    assert reg.latest_version("acme", "a") == 10


def test_concurrent_publishes_get_distinct_versions(reg: AdapterRegistry, src: Path):
    barrier = threading.Barrier(4)
    versions: list[int] = []

    def go():
        barrier.wait()
        versions.append(reg.publish(tenant="acme", name="race", source_dir=src, manifest=_manifest()).version)

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(versions) == [1, 2, 3, 4]
    for v in versions:
        path, m = reg.resolve("acme", "race", v)
        assert m.version == v
        reg.verify(path, m)
    assert _tmp_dirs(reg.root) == []


def test_failure_mid_copy_leaves_nothing(reg: AdapterRegistry, src: Path, monkeypatch):
    real = registry_mod._copy_and_hash
    calls = []

    def failing(a: Path, b: Path) -> str:
        calls.append(b)
        if a.name == "adapter_model.safetensors":
            with open(b, "wb") as f:
                f.write(b"half")  # a partial file exists when the disk fills up
            raise OSError(28, "No space left on device")
        return real(a, b)

    monkeypatch.setattr(registry_mod, "_copy_and_hash", failing)
    with pytest.raises(OSError):
        reg.publish(tenant="acme", name="a", source_dir=src, manifest=_manifest())
    assert len(calls) == 2
    assert reg.latest_version("acme", "a") is None
    assert _tmp_dirs(reg.root) == []
    assert list((reg.root / "acme" / "a").iterdir()) == []
    monkeypatch.setattr(registry_mod, "_copy_and_hash", real)
    assert reg.publish(tenant="acme", name="a", source_dir=src, manifest=_manifest()).version == 1


def test_failure_at_rename_leaves_nothing(reg: AdapterRegistry, src: Path, monkeypatch):
    def boom(a, b):
        raise OSError(5, "I/O error")

    monkeypatch.setattr(registry_mod.os, "rename", boom)
    with pytest.raises(OSError):
        reg.publish(tenant="acme", name="a", source_dir=src, manifest=_manifest())
    monkeypatch.undo()
    assert reg.latest_version("acme", "a") is None and _tmp_dirs(reg.root) == []


def test_bad_manifest_and_missing_files_refused_before_copy(reg: AdapterRegistry, src: Path):
    with pytest.raises(InvalidInput) as exc:
        reg.publish(tenant="acme", name="a", source_dir=src, manifest={"base_model": "x"})
    assert exc.value.param == "manifest"
    (src / "adapter_config.json").unlink()
    with pytest.raises(InvalidInput) as exc:
        reg.publish(tenant="acme", name="a", source_dir=src, manifest=_manifest())
    assert exc.value.param == "source_dir"
    assert reg.latest_version("acme", "a") is None and _tmp_dirs(reg.root) == []


def test_verify_catches_tampering(reg: AdapterRegistry, src: Path):
    reg.publish(tenant="acme", name="a", source_dir=src, manifest=_manifest())
    path, m = reg.resolve("acme", "a")
    weights = path / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[100] ^= 0x01  # one flipped bit
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        reg.verify(path, m)
    weights.unlink()
    with pytest.raises(IntegrityError):
        reg.verify(path, m)
    with pytest.raises(IntegrityError):  # a manifest that hashes nothing proves nothing
        reg.verify(path, m.model_copy(update={"files": {}}))
    with pytest.raises(IntegrityError):  # nor may it point elsewhere
        reg.verify(path, m.model_copy(update={"files": {**m.files, "../../etc/passwd": "0" * 64}}))


def test_tampered_or_moved_manifest_is_integrity_error(reg: AdapterRegistry, src: Path):
    reg.publish(tenant="acme", name="a", source_dir=src, manifest=_manifest())
    mf = reg.root / "acme" / "a" / "1" / "manifest.json"
    data = json.loads(mf.read_text())
    data["tenant"] = "other"
    mf.write_text(json.dumps(data))
    with pytest.raises(IntegrityError):
        reg.resolve("acme", "a")
    mf.write_text("{not json")
    with pytest.raises(IntegrityError):
        reg.resolve("acme", "a")
    assert reg.list("acme") == []  # listing skips the broken one instead of failing


BAD_NAMES = [
    "..", "../x", "a/../../b", "a/b", "/abs", "a\x00b", "", ".hidden", "UPPER", "a" * 64,
    "ａｂｃ",            # fullwidth letters
    "a\u200bb",          # zero-width space
    "caf\u00e9",         # accented letter
    "a\u2024b",          # one-dot leader (looks like '.')
    "a\u2215b",          # division slash (looks like '/')
    "x\n", "a b", "a\\b", "1.2.3..",
]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_bad_names_refused(reg: AdapterRegistry, src: Path, bad: str):
    with pytest.raises(InvalidInput):
        reg.publish(tenant="acme", name=bad, source_dir=src, manifest=_manifest())
    with pytest.raises(InvalidInput):
        reg.publish(tenant=bad, name="ok", source_dir=src, manifest=_manifest())
    with pytest.raises(InvalidInput):
        reg.resolve("acme", bad)
    with pytest.raises(InvalidInput):
        reg.latest_version(bad, "ok")
    with pytest.raises(InvalidInput):
        reg.delete("acme", bad)
    assert list(reg.root.iterdir()) == []


def test_tenant_names_may_not_contain_dots(reg: AdapterRegistry, src: Path):
    with pytest.raises(InvalidInput):
        reg.publish(tenant="a.b", name="ok", source_dir=src, manifest=_manifest())
    assert reg.publish(tenant="a-b_c", name="v1.2_x-y", source_dir=src, manifest=_manifest()).version == 1


def test_bad_versions_refused(reg: AdapterRegistry, src: Path):
    reg.publish(tenant="acme", name="a", source_dir=src, manifest=_manifest())
    for bad in (0, -1, True, "1", 1.0, 10**10):
        with pytest.raises(InvalidInput):
            reg.resolve("acme", "a", bad)


def test_symlink_escape_refused(reg: AdapterRegistry, src: Path, tmp_path: Path):
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, reg.root / "evil")
    with pytest.raises(InvalidInput):
        reg.publish(tenant="evil", name="a", source_dir=src, manifest=_manifest())
    assert list(outside.iterdir()) == []


def test_tenant_isolation(reg: AdapterRegistry, src: Path):
    reg.publish(tenant="acme", name="shared-name", source_dir=src, manifest=_manifest(base_model="A"))
    reg.publish(tenant="beta", name="shared-name", source_dir=src, manifest=_manifest(base_model="B"))
    reg.publish(tenant="beta", name="only-beta", source_dir=src, manifest=_manifest())
    assert reg.resolve("acme", "shared-name")[1].base_model == "A"
    assert reg.resolve("beta", "shared-name")[1].base_model == "B"
    with pytest.raises(NotFound):
        reg.resolve("acme", "only-beta")
    assert [m.name for m in reg.list("acme")] == ["shared-name"]
    assert [m.name for m in reg.list("beta")] == ["only-beta", "shared-name"]
    assert reg.list("nobody") == []


def test_list_returns_latest_and_skips_tmp(reg: AdapterRegistry, src: Path):
    reg.publish(tenant="acme", name="a", source_dir=src, manifest=_manifest())
    reg.publish(tenant="acme", name="a", source_dir=src, manifest=_manifest())
    reg.publish(tenant="acme", name="b", source_dir=src, manifest=_manifest())
    (reg.root / "acme" / "a" / (".tmp-" + "0" * 32)).mkdir()
    assert [(m.name, m.version) for m in reg.list("acme")] == [("a", 2), ("b", 1)]
    assert reg.list_versions("acme", "zzz") == []


def test_delete(reg: AdapterRegistry, src: Path):
    for _ in range(3):
        reg.publish(tenant="acme", name="a", source_dir=src, manifest=_manifest())
    reg.delete("acme", "a", 3)
    assert reg.latest_version("acme", "a") == 2
    with pytest.raises(NotFound):
        reg.delete("acme", "a", 3)
    # the next publish after deleting the latest reuses no live number
    assert reg.publish(tenant="acme", name="a", source_dir=src, manifest=_manifest()).version == 3
    reg.delete("acme", "a")
    assert reg.latest_version("acme", "a") is None and reg.list("acme") == []
    with pytest.raises(NotFound):
        reg.delete("acme", "a")
    assert _tmp_dirs(reg.root) == []


def test_clean_stale_tmp_spares_live_publish(reg: AdapterRegistry, src: Path, tmp_path: Path):
    reg.publish(tenant="acme", name="a", source_dir=src, manifest=_manifest())
    stale1 = reg.root / "acme" / "a" / (".tmp-" + "1" * 32)
    stale2 = reg.root / "acme" / (".tmp-" + "2" * 32)  # a crashed whole-adapter delete
    for d in (stale1, stale2):
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes(b"x")
    # A live writer in another process holds the flock on its tmp dir.
    live = reg.root / "acme" / "a" / (".tmp-" + "3" * 32)
    live.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(30)", str(live)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert reg.clean_stale_tmp() == 2
        assert not stale1.exists() and not stale2.exists() and live.exists()
    finally:
        holder.kill()
        holder.wait()
    assert reg.clean_stale_tmp() == 1 and not live.exists()
    assert reg.resolve("acme", "a")[1].version == 1  # real versions untouched
