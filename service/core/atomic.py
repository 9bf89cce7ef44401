"""Directories that appear whole or not at all: written under a temp name beside their
destination, fsynced, then renamed into place. A process killed mid-write leaves only a
`.<name>.tmp-*` directory, which no reader takes for the real one."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_files(d: Path) -> None:
    """Flush every file under `d` to disk (so the rename never publishes unwritten data)."""
    for f in Path(d).rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


@contextmanager
def atomic_dir(dst: Path | str, *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temp dir beside `dst`; when the block ends cleanly its files are fsynced
    and it is renamed to `dst` (an existing `dst` is removed first when `replace`, else the
    rename fails unless `dst` is an empty dir). On any error the temp dir is removed."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
        fsync_files(tmp)
        if replace and dst.exists():
            shutil.rmtree(dst)
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
