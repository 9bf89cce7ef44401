"""Training data: streaming validation of uploaded JSONL, normalization to conversations, and
loading of `datasets`-library sources (hub names, saved dataset dirs, parquet/json files).

Pure: the `datasets` library is imported lazily, only by `load_dataset_source` (workers).

Accepted JSONL rows (one format per file, detected from the first row):
    advertisegen  {"content": "...", "summary": "..."}
    chatglm3      {"conversations": [{"role": "user", "content": "..."}, ...]}
    openai        {"messages": [{"role": "user", "content": "..."}, ...]}
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from service.core.domain import CHAT_ROLES, DatasetFormat, DatasetSource
from service.core.errors import InvalidInput, PayloadTooLarge

log = logging.getLogger("tuneserve.datasets")

# Roles per chat format, in a fixed display order for error messages.
ROLES: dict[DatasetFormat, tuple[str, ...]] = {
    DatasetFormat.chatglm3: tuple(r for r in ("system", "user", "assistant", "observation") if r in CHAT_ROLES),
    DatasetFormat.openai: ("system", "user", "assistant"),
}
LIST_KEY: dict[DatasetFormat, str] = {DatasetFormat.chatglm3: "conversations", DatasetFormat.openai: "messages"}

_FORMAT_HINT = ('expected {"content", "summary"} (AdvertiseGen), {"conversations": [...]} (ChatGLM3) '
                'or {"messages": [...]} (OpenAI chat)')

# A JSON string (escapes included), unrolled so it runs in linear time.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_INNERMOST = re.compile(rb"\[\]|\{\}")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth_exceeds(line: bytes, max_depth: int) -> bool:
    """True when the nesting of [] / {} outside strings exceeds max_depth. Done before
    json.loads, whose recursion a deeply nested line could exhaust. Each pass deletes every
    innermost pair (C-speed replace), so the number of passes is the depth; it stops after
    max_depth + 1. Unbalanced input stops early and is left to json.loads to report."""
    brackets = _JSON_STRING.sub(b"", line).translate(None, _NOT_BRACKETS)
    depth = 0
    while brackets:
        reduced = _INNERMOST.sub(b"", brackets)  # one scan: only pairs innermost before it
        if reduced == brackets:
            break
        brackets = reduced
        depth += 1
        if depth > max_depth:
            return True
    return False


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def lone_surrogate_field(value: Any, where: str = "") -> str | None:
    """The field (e.g. `messages[0].content`; a bad key counts as its own field) of the first
    string holding a lone UTF-16 surrogate, or None. json.loads accepts `"\\ud800"`, but such a
    string cannot be encoded as UTF-8, so no tokenizer can take it. The field's name is returned
    printable (a surrogate in a key shows as `\\ud800`)."""
    if isinstance(value, str):
        return (where or "(row)") if _has_surrogate(value) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        if isinstance(k, int):
            field = f"{where}[{k}]"
        else:
            field = f"{where}.{k}" if where else k
            if _has_surrogate(k):
                return field.encode("utf-8", "backslashreplace").decode("utf-8")
        if (found := lone_surrogate_field(v, field)) is not None:
            return found
    return None


def _surrogate_problem(raw: bytes, row: Any) -> tuple[str, str] | None:
    # Only a `\u` escape can produce a surrogate (the UTF-8 decoder refuses encoded ones).
    if b"\\u" not in raw:
        return None
    field = lone_surrogate_field(row)
    return None if field is None else (field, f"{field} holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape)")


def detect_format(row: dict) -> DatasetFormat | None:
    if "conversations" in row:
        return DatasetFormat.chatglm3
    if "messages" in row:
        return DatasetFormat.openai
    if "content" in row or "summary" in row:
        return DatasetFormat.advertisegen
    return None


def _non_empty_str(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def row_problem(row: Any, fmt: DatasetFormat) -> tuple[str, str] | None:
    """(field, message) describing the first problem of `row` as `fmt`, or None when valid."""
    if not isinstance(row, dict):
        return "", "must be a JSON object"
    if fmt is DatasetFormat.advertisegen:
        for key in ("content", "summary"):
            if key not in row:
                return key, f"{key} is missing"
            if not _non_empty_str(row[key]):
                return key, f"{key} must be a non-empty string"
        return None
    key = LIST_KEY[fmt]
    turns = row.get(key)
    if key not in row:
        return key, f"{key} is missing"
    if not isinstance(turns, list) or not turns:
        return key, f"{key} must be a non-empty list"
    roles = ROLES[fmt]
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            return where, f"{where} must be an object with role and content"
        role = turn.get("role")
        if role not in roles:
            return f"{where}.role", f"{where}.role must be one of {','.join(roles)}"
        content = turn.get("content")
        if not isinstance(content, str):
            return f"{where}.content", f"{where}.content must be a string"
        if role == "assistant" and not content.strip():
            return f"{where}.content", f"{where}.content must not be empty for an assistant turn"
    if not any(t["role"] == "assistant" for t in turns):
        return key, f"{key} needs at least one assistant turn"
    if turns[-1]["role"] != "assistant":
        return f"{key}[{len(turns) - 1}].role", f"{key}: the last turn must be from the assistant"
    return None


class DatasetValidator:
    """Validates an uploaded JSONL file chunk by chunk, keeping at most one line in memory.
    A bad line does not stop it: finish() refuses the file listing the first
    MAX_REPORTED_LINES bad lines and how many there are (size and row limits stop it at once)."""

    MAX_REPORTED_LINES = 20

    def __init__(self, *, max_bytes: int, max_rows: int, max_line_bytes: int, max_depth: int):
        self.max_bytes = max_bytes
        self.max_rows = max_rows
        self.max_line_bytes = max_line_bytes
        self.max_depth = max_depth
        self.bytes = 0
        self.rows = 0
        self.format: DatasetFormat | None = None
        self._format_line = 0
        self._line_no = 0  # number of the last complete line processed
        self._buf = bytearray()
        self._skipping = False  # inside a line already refused as too long: drop it up to its end
        self._finished = False
        self.problems: list[dict[str, Any]] = []  # the first MAX_REPORTED_LINES {"line", "field", "message"}
        self.bad_lines = 0

    def _bad(self, line: int, field: str, message: str) -> None:
        self.bad_lines += 1
        if len(self.problems) < self.MAX_REPORTED_LINES:
            self.problems.append({"line": line, "field": field, "message": message})

    def feed(self, chunk: bytes) -> None:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self.bytes += len(chunk)
        if self.bytes > self.max_bytes:
            raise PayloadTooLarge(f"file exceeds {self.max_bytes} bytes", param="file")
        self._buf += chunk
        start = 0
        while (nl := self._buf.find(b"\n", start)) != -1:
            if self._skipping:
                self._skipping = False
                self._line_no += 1
            else:
                self._line(bytes(self._buf[start:nl]))
            start = nl + 1
        del self._buf[:start]
        if len(self._buf) > self.max_line_bytes:  # refuse before buffering an endless line
            if not self._skipping:
                self._bad(self._line_no + 1, "", f"line longer than {self.max_line_bytes} bytes")
                self._skipping = True
            self._buf.clear()

    def _line(self, raw: bytes) -> None:
        self._line_no += 1
        problem = self._row_problem(self._line_no, raw)
        if problem is not None:
            self._bad(self._line_no, *problem)

    def _row_problem(self, n: int, raw: bytes) -> tuple[str, str] | None:
        """(field, message) of what is wrong with line n, or None (a blank line, a good row)."""
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if n == 1 and raw.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte order mark
            raw = raw[3:]
        if len(raw) > self.max_line_bytes:
            return "", f"line longer than {self.max_line_bytes} bytes"
        if not raw.strip():
            return None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return "", f"not valid UTF-8 (byte {exc.start + 1} of the line)"
        if json_depth_exceeds(raw, self.max_depth):
            return "", f"JSON nested deeper than {self.max_depth} levels"
        try:
            row = json.loads(text, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:
            return "", f"not valid JSON ({exc})"
        if not isinstance(row, dict):
            return "", "must be a JSON object"
        if (problem := _surrogate_problem(raw, row)) is not None:
            return problem
        if self.format is None:
            fmt = detect_format(row)
            if fmt is None:
                return "", f"unknown format: {_FORMAT_HINT}"
            self.format, self._format_line = fmt, n
        elif detect_format(row) is not self.format:
            return "", (f"every row must have the format of line {self._format_line} "
                        f"({self.format.value}); {_FORMAT_HINT}")
        problem = row_problem(row, self.format)
        if problem is not None:
            return problem
        self.rows += 1
        if self.rows > self.max_rows:
            raise PayloadTooLarge(f"file has more than {self.max_rows} rows", param="file")
        return None

    def _refusal(self) -> InvalidInput:
        shown = self.problems
        listed = "; ".join(f"line {p['line']}: {p['message']}" for p in shown[:3])
        if self.bad_lines == 1:
            return InvalidInput(listed, param="file", details=shown)
        more = f"; ... (the first {len(shown)} are in error.details)" if self.bad_lines > 3 else ""
        return InvalidInput(f"{self.bad_lines} lines are invalid: {listed}{more}", param="file", details=shown)

    def finish(self) -> tuple[DatasetFormat, int]:
        if not self._finished:
            self._finished = True
            if self._buf and not self._skipping:
                rest, self._buf = bytes(self._buf), bytearray()
                self._line(rest)
        if self.bad_lines:
            raise self._refusal()
        if self.format is None or self.rows == 0:
            raise InvalidInput("the file has no rows", param="file",
                               details=[{"line": 1, "field": "", "message": "the file has no rows"}])
        return self.format, self.rows


def validate_file(path: Path, **limits: int) -> tuple[DatasetFormat, int]:
    """Validate a JSONL file already on disk (same rules as an upload)."""
    v = DatasetValidator(**limits)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            v.feed(chunk)
    return v.finish()


def conversation_from_row(row: dict, fmt: DatasetFormat) -> list[dict]:
    """Normalize a row to [{"role", "content"}, ...]; AdvertiseGen is user=content, assistant=summary."""
    fmt = DatasetFormat(fmt)
    try:
        if fmt is DatasetFormat.advertisegen:
            return [{"role": "user", "content": row["content"]}, {"role": "assistant", "content": row["summary"]}]
        return [{"role": t["role"], "content": t["content"]} for t in row[LIST_KEY[fmt]]]
    except (KeyError, TypeError) as exc:
        raise InvalidInput(f"row is not in {fmt.value} format (missing {exc})", param="file") from None


def read_conversations(path: Path) -> Iterator[list[dict]]:
    """Conversations of a validated JSONL file (for the worker). Validates again, cheaply, so a
    file changed on disk since upload fails with a clear line number instead of a KeyError."""
    fmt: DatasetFormat | None = None
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8-sig" if n == 1 else "utf-8"))
            except (ValueError, RecursionError) as exc:
                raise InvalidInput(f"{Path(path).name} line {n}: not valid JSON ({exc})", param="training_file") from None
            fmt = fmt or (detect_format(row) if isinstance(row, dict) else None)
            if fmt is None:
                raise InvalidInput(f"{Path(path).name} line {n}: unknown format: {_FORMAT_HINT}", param="training_file")
            problem = _surrogate_problem(raw, row) or row_problem(row, fmt)
            if problem is not None:
                raise InvalidInput(f"{Path(path).name} line {n}: {problem[1]}", param="training_file")
            yield conversation_from_row(row, fmt)


# ---------------------------------------------------------------------------------------
# `datasets` library sources
# ---------------------------------------------------------------------------------------
# "owner/name" or "name" on the hub; never absolute, never dotted segments.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?$")
_FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}
_SPLIT = re.compile(r"^([A-Za-z0-9_.\-]+)(?:\[(-?\d*%?):(-?\d*%?)\])?$")


def _is_hub_id(path: str) -> bool:
    return bool(_HUB_ID.fullmatch(path)) and ".." not in path


def _looks_local(path: str) -> bool:
    return (path.startswith(("/", "./", "../", "~")) or "\\" in path
            or not _is_hub_id(path) or Path(path).suffix.lower() in _FILE_BUILDERS)


# A directory source is walked entry by entry at every check; past this it is refused rather
# than letting one request stat a whole filesystem.
MAX_DIR_ENTRIES = 10_000
_SAVED_MARKERS = ("dataset_dict.json", "state.json")


@dataclass(frozen=True)
class LocalDataset:
    """A local source after resolution: `path` is the real path (symlinks followed) and every
    file the worker may read through it resolves inside the dataset roots."""
    kind: Literal["file", "saved", "files_dir"]
    path: Path


def _within(real: Path, roots: list[Path]) -> bool:
    return any(real == r or real.is_relative_to(r) for r in roots)


def _refuse_path(param: str, message: str) -> InvalidInput:
    return InvalidInput(f"{param}.path {message}", param=f"{param}.path")


def _outside(param: str, what: str) -> InvalidInput:
    # Names only the entry the client's own path led to, never anything read from a file.
    return _refuse_path(param, f"{what} resolves outside the server's dataset directories")


def _saved_references(dirpath: Path, names: list[str], param: str) -> Iterator[Path]:
    """Paths a `save_to_disk` directory's metadata makes `load_from_disk` open: each split dir
    of dataset_dict.json, each `_data_files` entry of state.json (both joined to the dir)."""
    for marker, key in (("dataset_dict.json", "splits"), ("state.json", "_data_files")):
        if marker not in names:
            continue
        try:
            meta = json.loads((dirpath / marker).read_bytes())
            entries = meta[key]
            rels = [e["filename"] if key == "_data_files" else e for e in entries]
            if not all(isinstance(r, str) for r in rels):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise _refuse_path(param, f"holds a {marker} that is not a valid `save_to_disk` file") from None
        for rel in rels:
            yield dirpath / rel


def _check_tree(top: Path, roots: list[Path], param: str) -> None:
    """Every entry under `top` (symlinked dirs followed, each real dir once) and every file its
    saved-dataset metadata names must resolve inside the roots; metadata references must stay
    inside `top` itself."""
    seen: set[Path] = set()
    count = 0

    def onerror(exc: OSError) -> None:
        raise exc

    for dirpath, dirnames, filenames in os.walk(top, followlinks=True, onerror=onerror):
        here = Path(dirpath)
        real_dir = here.resolve()
        if not _within(real_dir, roots):
            raise _outside(param, f"entry {str(here.relative_to(top))!r}")
        if real_dir in seen:  # a symlink loop or a second link to a dir already checked
            dirnames[:] = []
            continue
        seen.add(real_dir)
        for name in filenames:
            count += 1
            if count > MAX_DIR_ENTRIES:
                raise _refuse_path(param, f"holds more than {MAX_DIR_ENTRIES} files")
            if not _within((here / name).resolve(), roots):
                raise _outside(param, f"entry {str((here / name).relative_to(top))!r}")
        for ref in _saved_references(here, filenames, param):
            if not ref.resolve().is_relative_to(top):
                raise _outside(param, f"a file named by {str(here.relative_to(top))!r}'s metadata")


def resolve_local_source(src: DatasetSource, allowed_roots: list[Path], *,
                         param: str = "training_dataset") -> LocalDataset | None:
    """None for a hub id. For a local path: resolve it and everything the loader will read
    through it, refusing whatever leaves allowed_roots. Run by the API at validation and by the
    worker again right before reading, so a path swapped after the job was created is caught.
    Any OS error (name too long, symlink loop, permission...) is the field's 400."""
    if not _looks_local(src.path):
        return None
    if "\x00" in src.path:
        raise _refuse_path(param, "must not contain NUL")
    roots = [Path(r).resolve() for r in allowed_roots]
    given = Path(src.path).expanduser()
    try:
        real = given.resolve()
        if not given.is_absolute() or not _within(real, roots):
            raise InvalidInput(f"{param}.path must be a hub dataset id or an absolute path under the "
                               "server's dataset directories", param=f"{param}.path")
        if not real.exists():
            raise _refuse_path(param, f"{src.path!r} does not exist")
        if real.is_file():
            if real.suffix.lower() not in _FILE_BUILDERS or given.suffix.lower() not in _FILE_BUILDERS:
                raise _refuse_path(param, f"has an unsupported file type {given.suffix!r} "
                                          f"(use {', '.join(sorted(_FILE_BUILDERS))} or a dataset directory)")
            return LocalDataset("file", real)
        if not real.is_dir():
            raise _refuse_path(param, "is neither a file nor a directory")
        if src.name is not None:
            raise InvalidInput(f"{param}.name applies to hub datasets only", param=f"{param}.name")
        _check_tree(real, roots, param)
        kind = "saved" if any((real / m).is_file() for m in _SAVED_MARKERS) else "files_dir"
        return LocalDataset(kind, real)
    except OSError as exc:  # ENAMETOOLONG, ELOOP, EACCES...: the strerror only, no path echo
        why = os.strerror(exc.errno) if exc.errno else type(exc).__name__
        raise _refuse_path(param, f"cannot be used: {why}") from None
    except RuntimeError:  # Path.resolve's own symlink-loop error (Python < 3.13)
        raise _refuse_path(param, "cannot be used: a symlink loop") from None


def check_dataset_source(src: DatasetSource, allowed_roots: list[Path], *, param: str = "training_dataset") -> None:
    """The API's check: a hub id ("owner/name") passes (the worker loads it); a local path must
    resolve, with every file under it, inside allowed_roots. Raises InvalidInput."""
    resolve_local_source(src, allowed_roots, param=param)


def _slice(ds, split: str, param: str):
    """Apply a `name[a:b]` slice (ints or percents) to an already loaded Dataset."""
    m = _SPLIT.fullmatch(split)
    if not m or m.group(2) is None and m.group(3) is None:
        return ds
    n = len(ds)

    def bound(text: str, default: int) -> int:
        if not text:
            return default
        if text.endswith("%"):
            return int(n * int(text[:-1]) / 100)
        return int(text)

    start, stop = bound(m.group(2), 0), bound(m.group(3), n)
    indices = range(n)[start:stop]
    return ds.select(indices)


def _select_split(loaded, split: str, param: str):
    import datasets

    name = (_SPLIT.fullmatch(split) or re.match(r"(.*)", split)).group(1)
    if isinstance(loaded, datasets.DatasetDict):
        if name not in loaded:
            # Split names come from the dataset's files: count them, never echo them.
            raise InvalidInput(f"{param}.split {name!r} not found (the dataset has {len(loaded)} splits)",
                               param=f"{param}.split")
        loaded = loaded[name]
    return _slice(loaded, split, param)


def _to_conversations(ds, src: DatasetSource, param: str) -> list[list[dict]]:
    columns = list(ds.column_names)
    if src.max_rows is not None and len(ds) > src.max_rows:
        ds = ds.select(range(src.max_rows))
    # Chat-format datasets carry a conversations/messages column instead of content/summary.
    if src.content_column not in columns and src.content_column == "content":
        for fmt, key in LIST_KEY.items():
            if key in columns:
                out = []
                for i, turns in enumerate(ds[key]):
                    problem = row_problem({key: turns}, fmt)
                    if problem is not None:
                        raise InvalidInput(f"{param} row {i}: {problem[1]}", param=f"{param}.path")
                    out.append(conversation_from_row({key: turns}, fmt))
                return out
    for attr in ("content_column", "summary_column"):
        column = getattr(src, attr)
        if column not in columns:
            # Column names are file contents (a CSV's first line): never echo them.
            raise InvalidInput(f"{param}.{attr}: column {column!r} not in the dataset "
                               f"(it has {len(columns)} columns)", param=f"{param}.{attr}")
    out = []
    for i, (content, summary) in enumerate(zip(ds[src.content_column], ds[src.summary_column])):
        for attr, value in (("content_column", content), ("summary_column", summary)):
            if not _non_empty_str(value):
                raise InvalidInput(f"{param} row {i}: column {getattr(src, attr)!r} must be a non-empty string",
                                   param=f"{param}.{attr}")
        out.append([{"role": "user", "content": content}, {"role": "assistant", "content": summary}])
    if not out:
        raise InvalidInput(f"{param}: the selected split has no rows", param=f"{param}.split")
    return out


def _data_files_of_dir(local: LocalDataset, roots: list[Path], param: str) -> tuple[str, dict[str, list[str]]]:
    """(builder, split -> files) of a directory of data files, by the `datasets` library's own
    split-by-name rules but never its README configs (their data_files may name any path); each
    file is checked again after resolution."""
    from datasets.data_files import DataFilesDict, EmptyDatasetError, get_data_patterns

    try:
        found = DataFilesDict.from_patterns(get_data_patterns(str(local.path)), base_path=str(local.path))
    except EmptyDatasetError:
        raise _refuse_path(param, f"holds no data files ({', '.join(sorted(_FILE_BUILDERS))})") from None
    files = {split: [str(Path(f).resolve()) for f in listed] for split, listed in found.items()}
    builders = {_FILE_BUILDERS.get(Path(f).suffix.lower()) for listed in files.values() for f in listed}
    if len(builders) != 1 or None in builders:
        raise _refuse_path(param, f"must hold data files of one type ({', '.join(sorted(_FILE_BUILDERS))})")
    real_roots = [Path(r).resolve() for r in roots]
    for listed in files.values():
        for f in listed:
            if not _within(Path(f), real_roots):
                raise _outside(param, "a data file")
    return builders.pop(), files


def _load(src: DatasetSource, local: LocalDataset | None, roots: list[Path], param: str):
    import datasets  # heavy: only where data is really loaded

    if local is None:
        if Path(src.path).expanduser().exists():
            # datasets would silently prefer a relative local dir over the hub id.
            raise InvalidInput(f"{param}.path {src.path!r} is ambiguous (a relative local path and a hub id); "
                               "give an absolute path", param=f"{param}.path")
        return datasets.load_dataset(src.path, src.name, split=src.split)
    if local.kind == "saved":
        return _select_split(datasets.load_from_disk(str(local.path)), src.split, param)
    if local.kind == "file":
        m = _SPLIT.fullmatch(src.split)
        split_name = m.group(1) if m else "train"
        return datasets.load_dataset(_FILE_BUILDERS[local.path.suffix.lower()],
                                     data_files={split_name: str(local.path)}, split=src.split)
    builder, files = _data_files_of_dir(local, roots, param)
    return datasets.load_dataset(builder, data_files=files, split=src.split)


def load_dataset_source(src: DatasetSource, *, allowed_roots: list[Path],
                        param: str = "training_dataset") -> list[list[dict]]:
    """Load a dataset as conversations (the worker). Local: a `save_to_disk` dir (load_from_disk),
    a dir of data files or a parquet/json/csv file, each re-resolved against allowed_roots here,
    at read time; else a hub id (load_dataset(path, name, split=...)). Columns content/summary
    map to user/assistant. Errors about local data never quote the library's message (it can
    hold the file's lines); the worker's log has it."""
    local = resolve_local_source(src, allowed_roots, param=param)
    try:
        ds = _load(src, local, allowed_roots, param)
    except InvalidInput:
        raise
    except Exception as exc:  # hub unreachable, dataset missing, unreadable or malformed files...
        where = "split" if isinstance(exc, (ValueError, KeyError)) else "path"
        if local is not None:
            log.warning("%s: cannot load %s", param, local.path, exc_info=True)
            detail = type(exc).__name__
        else:
            detail = f"{type(exc).__name__}: {exc}"
        what = f"split {src.split!r} of {src.path!r}" if where == "split" else repr(src.path)
        raise InvalidInput(f"{param}: cannot load {what}: {detail}", param=f"{param}.{where}") from exc
    return _to_conversations(ds, src, param)
