"""`tuneserve worker` (and the worker `up` starts) runs Celery through service.logging's
celery_main, which ignores exactly Celery's "running the worker with superuser privileges"
SecurityWarning: it is printed raw on `make run`'s terminal on every start as root (issue 14,
section 5). Other warnings, SecurityWarnings included, still show."""
from __future__ import annotations

import warnings

import pytest
from celery import platforms
from celery.exceptions import SecurityError, SecurityWarning

from service.logging import silence_celery_root_warning


@pytest.fixture
def as_root(monkeypatch):
    for name in ("getuid", "geteuid"):
        monkeypatch.setattr(platforms.os, name, lambda: 0)


def _check_privileges() -> list[str]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        platforms.check_privileges({"json"})
    return [str(w.message) for w in seen if issubclass(w.category, SecurityWarning)]


def test_celery_warns_as_root_without_the_filter(as_root):
    """The control: Celery's own check does warn as root (the filter has something to do)."""
    assert any("superuser privileges" in m for m in _check_privileges())


def test_the_filter_ignores_only_the_root_warning(as_root, monkeypatch):
    monkeypatch.setattr(warnings, "filters", list(warnings.filters))  # undone after the test
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        silence_celery_root_warning()  # what celery_main does before Celery starts
        platforms.check_privileges({"json"})
        warnings.warn(SecurityWarning("another security warning"))
        warnings.warn(UserWarning("You're running the worker with superuser privileges (not Celery's)"))
    messages = [(w.category, str(w.message)) for w in seen]
    assert not any(c is SecurityWarning and "superuser privileges" in m for c, m in messages), messages
    assert (SecurityWarning, "another security warning") in messages
    assert any(c is UserWarning for c, _ in messages)


def test_the_real_guard_stays(as_root, monkeypatch):
    """As root with pickle accepted Celery still refuses to start (unless C_FORCE_ROOT)."""
    monkeypatch.delenv("C_FORCE_ROOT", raising=False)
    with warnings.catch_warnings():
        silence_celery_root_warning()
        with pytest.raises(SecurityError):
            platforms.check_privileges({"pickle"})


def test_celery_main_installs_the_filter_before_celery_runs(monkeypatch):
    import celery.__main__

    import service.logging

    monkeypatch.setattr(warnings, "filters", list(warnings.filters))
    seen = []
    monkeypatch.setattr(celery.__main__, "main", lambda: seen.append(
        any(f[0] == "ignore" and f[2] is SecurityWarning and f[1] is not None
            and f[1].match("You're running the worker with superuser privileges: ...") for f in warnings.filters)))
    monkeypatch.setattr(service.logging.sys, "argv", ["x"])
    try:
        service.logging.celery_main(["--version"])
    finally:
        from celery import signals
        signals.setup_logging.disconnect(service.logging._celery_setup_logging)
    assert seen == [True]
