"""Adapter cache: registry -> CPU tier -> GPU pool columns, with leases.

* Front end (`acquire`, any asyncio loop): resolves the latest published version on every
  request (a republished adapter is a new key, never stale weights), returns a lease that
  pins the GPU copy until the request ends. Concurrent first requests for one
  (tenant, name, version) share one load future, so it is read and uploaded once.
* Loader threads: read + sha256-verify + check against the base + parse into pool layout,
  on the CPU, beside decoding. Parsed adapters stay in a CPU LRU tier (count-bounded).
* Decode thread (`service_uploads`, the single owner of GPU state): copies parsed adapters
  into free pool columns between steps (one small host-to-device copy), evicting
  least-recently-used GPU adapters that no request holds and that are not pinned.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from service.core.domain import AdapterManifest
from service.core.errors import AdapterMismatch, NotFound, RequestTimeout, ServiceUnavailable, TuneserveError
from service.inference.lora import ParsedAdapter, parse_peft_adapter

log = logging.getLogger(__name__)

AdapterKey = tuple[str, str, int]  # tenant, name, version


@dataclass(eq=False)
class GpuAdapter:
    key: AdapterKey
    cols: list[int]
    targeted: set[str]
    manifest: AdapterManifest
    refs: int = 0
    pinned: bool = False
    stale: bool = False  # a newer version exists: evict as soon as nobody holds it
    resident: bool = True

    @property
    def hw(self) -> int:  # pool columns a row of this adapter needs: 0..max(cols)
        return max(self.cols) + 1 if self.cols else 0

    @property
    def version(self) -> int:
        return self.key[2]


@dataclass(eq=False)
class AdapterLease:
    entry: GpuAdapter
    _cache: "AdapterCache" = field(repr=False)
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._cache._release(self.entry)


@dataclass(eq=False)
class _Upload:
    key: AdapterKey
    parsed: ParsedAdapter
    manifest: AdapterManifest
    future: concurrent.futures.Future
    since: float = field(default_factory=time.monotonic)


class BaseIdentity:
    """What an adapter's manifest must agree with to be served on this base."""

    def __init__(self, names: set[str], fingerprint: str | None, served_targets: set[str]):
        self.names = {n for n in names if n}
        self.fingerprint = fingerprint
        self.served_targets = served_targets  # short names, e.g. {"q_proj", "k_proj", "v_proj"}

    def check(self, manifest: AdapterManifest) -> None:
        if manifest.base_model_fingerprint and self.fingerprint:
            if manifest.base_model_fingerprint != self.fingerprint:
                raise AdapterMismatch(
                    f"adapter {manifest.name!r} was trained on base {manifest.base_model!r} "
                    f"(fingerprint {manifest.base_model_fingerprint[:12]}), not on the served base "
                    f"(fingerprint {self.fingerprint[:12]})", param="model")
        elif manifest.base_model not in self.names and Path(manifest.base_model).name not in self.names:
            raise AdapterMismatch(
                f"adapter {manifest.name!r} was trained on base {manifest.base_model!r}; "
                f"this server serves {sorted(self.names)}", param="model")
        missing = [t for t in manifest.target_modules
                   if t.rsplit(".", 1)[-1] not in self.served_targets]
        if missing:
            raise AdapterMismatch(
                f"adapter {manifest.name!r} targets {missing}; this server serves LoRA on "
                f"{sorted(self.served_targets)} only", param="model")


class AdapterCache:
    def __init__(self, registry, identity: BaseIdentity, *, shapes: dict[str, tuple[int, int]],
                 pool_dtype, capacity_columns: int, bytes_per_column: int, cpu_capacity: int,
                 wake: Callable[[], None], pin_memory: bool = False, loader_threads: int = 2):
        self.registry = registry
        self.identity = identity
        self.shapes = shapes
        self.pool_dtype = pool_dtype
        self.capacity_columns = capacity_columns
        self.bytes_per_column = bytes_per_column
        self.cpu_capacity = max(0, cpu_capacity)
        self._wake = wake
        self._pin = pin_memory
        self._lock = threading.Lock()
        self._gpu: OrderedDict[AdapterKey, GpuAdapter] = OrderedDict()  # LRU order
        self._cpu: OrderedDict[AdapterKey, tuple[ParsedAdapter, AdapterManifest]] = OrderedDict()
        self._inflight: dict[AdapterKey, concurrent.futures.Future] = {}
        self._uploads: list[_Upload] = []
        self._loader = concurrent.futures.ThreadPoolExecutor(loader_threads, thread_name_prefix="adapter-load")
        # sha256 of an adapter runs beside its parsing (hashlib drops the GIL on big buffers),
        # so a load costs max(hash, parse) instead of their sum.
        self._hasher = concurrent.futures.ThreadPoolExecutor(loader_threads, thread_name_prefix="adapter-hash")
        # hits: resident at request time; misses: not (joined_load of them waited for a load
        # another request started); loads: registry reads; uploads: copies into the GPU pool.
        self.counters = dict(hits=0, misses=0, joined_load=0, loads=0, uploads=0, evictions=0,
                             cpu_hits=0, cpu_evictions=0, load_errors=0)
        self.load_seconds: list[float] = []  # registry read+verify+parse, most recent last

    # ------------------------------------------------------------------------------
    # front end
    # ------------------------------------------------------------------------------
    async def acquire(self, tenant: str, name: str, deadline: float, version: int | None = None) -> AdapterLease:
        """A lease on `version` (the caller's lookup) or the latest one; a retry after an
        eviction race looks the latest up again."""
        for attempt in range(4):
            if version is None or attempt:
                version = await asyncio.to_thread(self._latest_version, tenant, name)
            key = (tenant, name, version)
            with self._lock:
                entry = self._gpu.get(key)
                if entry is not None and entry.resident:
                    entry.refs += 1
                    self._gpu.move_to_end(key)
                    if attempt == 0:
                        self.counters["hits"] += 1
                    return AdapterLease(entry, self)
                fut = self._inflight.get(key)
                if attempt == 0:
                    self.counters["misses"] += 1
                    if fut is not None:
                        self.counters["joined_load"] += 1  # shares a load already under way
                if fut is None:
                    fut = concurrent.futures.Future()
                    self._inflight[key] = fut
                    self._loader.submit(self._load, key, fut)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RequestTimeout(f"timed out loading adapter {name!r}")
            try:
                await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)), remaining)
            except asyncio.TimeoutError:
                raise RequestTimeout(f"timed out loading adapter {name!r}") from None
        raise ServiceUnavailable(f"adapter {name!r} was evicted again before use; "
                                 "the GPU adapter budget is too small for the load")

    def _latest_version(self, tenant: str, name: str) -> int:
        try:
            version = self.registry.latest_version(tenant, name)
        except NotFound:
            version = None
        if version is None:
            raise NotFound(f"The model {name!r} does not exist", param="model", code="model_not_found")
        return int(version)

    def _release(self, entry: GpuAdapter) -> None:
        with self._lock:
            entry.refs -= 1
            wake = entry.refs == 0 and (entry.stale or bool(self._uploads))
        if wake:
            self._wake()

    def forget(self, tenant: str, name: str) -> None:
        """A deleted adapter: drop its CPU copies and mark its GPU copies stale (unpinned), so
        the decode thread frees their columns at its next iteration, or when the last request
        holding one ends. Requests after the delete fail in the registry (NotFound)."""
        with self._lock:
            for key in [k for k in self._cpu if k[:2] == (tenant, name)]:
                del self._cpu[key]
            held = [e for e in self._gpu.values() if e.key[:2] == (tenant, name)]
            for entry in held:
                entry.stale = True
                entry.pinned = False
        if held:
            self._wake()

    def pin(self, key: AdapterKey) -> None:
        with self._lock:
            if key in self._gpu:
                self._gpu[key].pinned = True

    # ------------------------------------------------------------------------------
    # loader threads
    # ------------------------------------------------------------------------------
    def _load(self, key: AdapterKey, fut: concurrent.futures.Future) -> None:
        try:
            with self._lock:
                cached = self._cpu.get(key)
                if cached is not None:
                    self._cpu.move_to_end(key)
                    self.counters["cpu_hits"] += 1
            if cached is None:
                t0 = time.perf_counter()
                cached = self._read(key)
                with self._lock:
                    self.counters["loads"] += 1
                    self.load_seconds = (self.load_seconds + [time.perf_counter() - t0])[-1000:]
                    if self.cpu_capacity:
                        self._cpu[key] = cached
                        self._drop_older_cpu(key)
                        while len(self._cpu) > self.cpu_capacity:
                            self._cpu.popitem(last=False)
                            self.counters["cpu_evictions"] += 1
            parsed, manifest = cached
            with self._lock:
                self._uploads.append(_Upload(key, parsed, manifest, fut))
            self._wake()
        except BaseException as exc:  # noqa: BLE001 - delivered to every waiter
            with self._lock:
                self._inflight.pop(key, None)
                self.counters["load_errors"] += 1
            if not isinstance(exc, TuneserveError):
                log.exception("loading adapter %s failed", key)
            fut.set_exception(exc)

    def _read(self, key: AdapterKey) -> tuple[ParsedAdapter, AdapterManifest]:
        tenant, name, version = key
        path, manifest = self.registry.resolve(tenant, name, version)
        self.identity.check(manifest)
        # sha256 of every file (IntegrityError otherwise), beside the parse; nothing parsed is
        # used unless the hashes match, and a hash mismatch wins over a parse error.
        verified = self._hasher.submit(self.registry.verify, path, manifest)
        try:
            parsed = parse_peft_adapter(Path(path), self.shapes, self.pool_dtype, pin=self._pin)
        except BaseException:
            verified.result()
            raise
        verified.result()
        if parsed.rank > self.capacity_columns:
            raise ServiceUnavailable(
                f"adapter {name!r} (rank {parsed.rank}) needs {parsed.rank * self.bytes_per_column} bytes "
                f"of GPU adapter memory; the budget holds {self.capacity_columns} rank columns "
                "(raise TUNESERVE_ADAPTER_GPU_BUDGET_BYTES)")
        return parsed, manifest

    def _drop_older_cpu(self, key: AdapterKey) -> None:
        for other in [k for k in self._cpu if k[:2] == key[:2] and k[2] < key[2]]:
            del self._cpu[other]

    # ------------------------------------------------------------------------------
    # decode thread (owner of the GPU pool)
    # ------------------------------------------------------------------------------
    def service_uploads(self, runner) -> None:
        """Evict stale unheld adapters, then upload pending ones into free columns."""
        with self._lock:
            if not self._uploads and not any(e.stale and e.refs == 0 for e in self._gpu.values()):
                return
            for entry in [e for e in self._gpu.values() if e.stale and e.refs == 0 and not e.pinned]:
                self._evict(entry, runner)
            pending, self._uploads = self._uploads, []
        still: list[_Upload] = []
        for up in pending:
            with self._lock:
                cols = runner.upload_adapter(up.parsed)
                while cols is None:
                    victim = next((e for e in self._gpu.values() if e.refs == 0 and not e.pinned), None)
                    if victim is None:
                        break
                    self._evict(victim, runner)
                    cols = runner.upload_adapter(up.parsed)
                if cols is None:  # every column is held by running requests: retry later
                    still.append(up)
                    continue
                entry = GpuAdapter(up.key, cols, set(up.parsed.modules), up.manifest)
                self._gpu[up.key] = entry
                self._inflight.pop(up.key, None)
                self.counters["uploads"] += 1
                for other in self._gpu.values():  # older versions of the same adapter
                    if other.key[:2] == up.key[:2] and other.key[2] < up.key[2]:
                        other.stale = True
                    elif other.key[:2] == up.key[:2] and other.key[2] > up.key[2]:
                        entry.stale = True  # resolved just before a republish
                for other in [e for e in self._gpu.values()
                              if e.stale and e.refs == 0 and not e.pinned and e is not entry]:
                    self._evict(other, runner)
            up.future.set_result(entry)
        if still:
            with self._lock:
                self._uploads = still + self._uploads

    @property
    def has_pending_uploads(self) -> bool:
        return bool(self._uploads)

    def _evict(self, entry: GpuAdapter, runner) -> None:  # lock held
        entry.resident = False
        self._gpu.pop(entry.key, None)
        runner.release_adapter(entry.cols, entry.targeted)
        self.counters["evictions"] += 1

    # ------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        with self._lock:
            gpu = [{"tenant": k[0], "name": k[1], "version": k[2], "rank_columns": len(e.cols),
                    "bytes": len(e.cols) * self.bytes_per_column, "refs": e.refs, "pinned": e.pinned}
                   for k, e in self._gpu.items()]
            used = sum(len(e.cols) for e in self._gpu.values())
            return dict(self.counters, gpu_resident=len(gpu), cpu_resident=len(self._cpu),
                        gpu_bytes_used=used * self.bytes_per_column,
                        gpu_budget_bytes=self.capacity_columns * self.bytes_per_column,
                        pending_uploads=len(self._uploads), loading=len(self._inflight),
                        resident=gpu)

    def shutdown(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)
        self._hasher.shutdown(wait=False, cancel_futures=True)
