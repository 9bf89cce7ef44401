"""Upload validation (streaming JSONL), normalization, and `datasets`-library sources."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.core.datasets import (
    DatasetValidator,
    check_dataset_source,
    conversation_from_row,
    json_depth_exceeds,
    load_dataset_source,
    read_conversations,
    validate_file,
)
from service.core.domain import DatasetFormat, DatasetSource
from service.core.errors import InvalidInput, PayloadTooLarge

REPO = Path(__file__).resolve().parents[2]
LIMITS = dict(max_bytes=1 << 20, max_rows=1000, max_line_bytes=4096, max_depth=8)

AD = {"content": "类型#裙*风格#复古", "summary": "复古风的裙子。"}
GLM = {"conversations": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "hello"}]}
OAI = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _jsonl(*rows) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r, ensure_ascii=False).encode()) + b"\n"
                    for r in rows)


def _validate(data: bytes, chunk: int = 7, **limits) -> tuple[DatasetFormat, int]:
    v = DatasetValidator(**{**LIMITS, **limits})
    for i in range(0, len(data), chunk):
        v.feed(data[i:i + chunk])
    return v.finish()


# ---------------------------------------------------------------------------------------
# Valid files
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("row,fmt", [(AD, DatasetFormat.advertisegen), (GLM, DatasetFormat.chatglm3),
                                     (OAI, DatasetFormat.openai)])
@pytest.mark.parametrize("chunk", [1, 5, 1 << 16])
def test_valid_formats_any_chunking(row, fmt, chunk):
    # chunk=1 splits multi-byte UTF-8 characters and lines at every possible place
    assert _validate(_jsonl(row, row, row), chunk=chunk) == (fmt, 3)


def test_blank_lines_crlf_bom_and_no_trailing_newline():
    data = b"\xef\xbb\xbf" + json.dumps(AD).encode() + b"\r\n\r\n   \n" + json.dumps(AD).encode()
    assert _validate(data) == (DatasetFormat.advertisegen, 2)


def test_brackets_inside_strings_do_not_count_as_depth():
    row = {"content": "[[[[[[[[[[{{{{{{{{ \" ]]] \\", "summary": "}}}}]]]]"}
    assert _validate(_jsonl(row), max_depth=2) == (DatasetFormat.advertisegen, 1)


def test_depth_exactly_at_limit_passes():
    # {"conversations": [ {..} ]} is depth 3
    assert _validate(_jsonl(GLM), max_depth=3)[1] == 1
    with pytest.raises(InvalidInput, match="line 1: JSON nested deeper than 2"):
        _validate(_jsonl(GLM), max_depth=2)


def test_shipped_sample_dataset_is_valid():
    sample = REPO / "service" / "data" / "advertisegen_sample.jsonl"
    if not sample.exists():
        pytest.skip("sample dataset not present")
    fmt, rows = validate_file(sample, **{**LIMITS, "max_bytes": 1 << 30})
    assert fmt is DatasetFormat.advertisegen and rows >= 100


# ---------------------------------------------------------------------------------------
# Malformed files: each error names the line and the field
# ---------------------------------------------------------------------------------------
MALFORMED = [
    # (name, data, expected message fragment, field)
    ("bad utf-8", _jsonl(AD, AD) + b'{"content": "\xff\xfe", "summary": "x"}\n', "line 3: not valid UTF-8", ""),
    ("not json", _jsonl(AD) + b'{"content": "a", "summary": }\n', "line 2: not valid JSON", ""),
    ("array row", _jsonl(AD) + b"[1, 2]\n", "line 2: must be a JSON object", ""),
    ("string row", b'"just text"\n', "line 1: must be a JSON object", ""),
    ("nan", b'{"content": "a", "summary": NaN}\n', "line 1: not valid JSON", ""),
    ("unknown format", _jsonl({"prompt": "a", "completion": "b"}), "line 1: unknown format", ""),
    ("mixed formats", _jsonl(AD, OAI), "line 2: every row must have the format of line 1", ""),
    ("ad empty summary", _jsonl(AD, {"content": "x", "summary": "  "}), "line 2: summary must be a non-empty string",
     "summary"),
    ("ad content number", _jsonl({"content": 5, "summary": "x"}), "line 1: content must be a non-empty string",
     "content"),
    ("ad missing summary", _jsonl({"content": "x"}), "line 1: summary is missing", "summary"),
    ("glm bad role", _jsonl(*[GLM] * 6, {"conversations": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "bot", "content": "c"}]}),
     "line 7: conversations[2].role must be one of system,user,assistant,observation", "conversations[2].role"),
    ("glm empty list", _jsonl({"conversations": []}), "line 1: conversations must be a non-empty list",
     "conversations"),
    ("glm not a list", _jsonl({"conversations": "hi"}), "line 1: conversations must be a non-empty list",
     "conversations"),
    ("glm turn not object", _jsonl({"conversations": ["hi"]}), "line 1: conversations[0] must be an object",
     "conversations[0]"),
    ("glm no assistant", _jsonl({"conversations": [{"role": "user", "content": "a"}]}),
     "line 1: conversations needs at least one assistant turn", "conversations"),
    ("glm last not assistant", _jsonl({"conversations": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]}),
     "line 1: conversations: the last turn must be from the assistant", "conversations[2].role"),
    ("glm content list", _jsonl({"conversations": [{"role": "user", "content": ["a"]},
                                                   {"role": "assistant", "content": "b"}]}),
     "line 1: conversations[0].content must be a string", "conversations[0].content"),
    ("glm empty assistant", _jsonl({"conversations": [{"role": "user", "content": "a"},
                                                      {"role": "assistant", "content": ""}]}),
     "line 1: conversations[1].content must not be empty", "conversations[1].content"),
    ("oai tool role", _jsonl(OAI, {"messages": [{"role": "tool", "content": "a"}, {"role": "assistant", "content": "b"}]}),
     "line 2: messages[0].role must be one of system,user,assistant", "messages[0].role"),
    ("oai observation role", _jsonl({"messages": [{"role": "observation", "content": "a"},
                                                  {"role": "assistant", "content": "b"}]}),
     "line 1: messages[0].role must be one of system,user,assistant", "messages[0].role"),
    ("oai null content", _jsonl({"messages": [{"role": "user", "content": "a"},
                                              {"role": "assistant", "content": None}]}),
     "line 1: messages[1].content must be a string", "messages[1].content"),
    ("too deep", _jsonl(AD) + b'{"content": "a", "summary": "b", "x": ' + b"[" * 50 + b"]" * 50 + b"}\n",
     "line 2: JSON nested deeper than 8 levels", ""),
    ("unbalanced deep", b"[" * 3000 + b"\n", "line 1: not valid JSON", ""),
    # json.loads takes a lone surrogate escape; the row could never be encoded for a tokenizer.
    ("lone surrogate", _jsonl(OAI, OAI) + b'{"messages": [{"role": "user", "content": "a\\ud800"}, '
                                         b'{"role": "assistant", "content": "b"}]}\n',
     "line 3: messages[0].content holds a lone UTF-16 surrogate", "messages[0].content"),
    ("lone low surrogate in summary", b'{"content": "a", "summary": "\\udfffx"}\n',
     "line 1: summary holds a lone UTF-16 surrogate", "summary"),
    ("lone surrogate in a key", b'{"content": "a", "summary": "b", "\\ud800k": 1}\n',
     "line 1: \\ud800k holds a lone UTF-16 surrogate", "\\ud800k"),
]


@pytest.mark.parametrize("name,data,message,field", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_rows(name, data, message, field):
    with pytest.raises(InvalidInput) as exc:
        _validate(data)
    err = exc.value
    assert err.param == "file"
    assert message in err.message, err.message
    assert err.details and err.details[0]["field"] == field
    assert err.status_code == 400


def test_empty_files_refused():
    for data in (b"", b"\n\n  \n"):
        with pytest.raises(InvalidInput, match="no rows"):
            _validate(data)


def test_line_too_long_refused_while_streaming():
    v = DatasetValidator(**LIMITS)
    v.feed(_jsonl(AD))
    for _ in range(100):  # an endless line without newline: refused, and dropped, while it streams in
        v.feed(b"x" * 1000)
        assert len(v._buf) <= LIMITS["max_line_bytes"] + 1000
    assert v.problems == [{"line": 2, "field": "", "message": "line longer than 4096 bytes"}]
    v.feed(b"\n" + _jsonl(AD) + b"[1]\n")  # the lines after it are still checked and counted
    with pytest.raises(InvalidInput, match="2 lines are invalid: line 2: line longer than 4096 bytes; line 4: "):
        v.finish()


def test_size_limit_enforced_while_streaming():
    v = DatasetValidator(**{**LIMITS, "max_bytes": 10_000})
    fed = 0
    with pytest.raises(PayloadTooLarge) as exc:
        while True:
            v.feed(_jsonl(AD))
            fed += 1
    assert exc.value.status_code == 413 and exc.value.param == "file"
    assert fed * len(_jsonl(AD)) <= 10_000


def test_row_limit():
    with pytest.raises(PayloadTooLarge, match="more than 3 rows"):
        _validate(_jsonl(*[AD] * 4), max_rows=3)
    assert _validate(_jsonl(*[AD] * 3), max_rows=3)[1] == 3


def test_pathological_nesting_is_safe():
    # 2 MB of brackets on one line: no RecursionError. The work is bounded by construction
    # (at most max_depth + 1 linear passes), not checked with a wall-clock bound.
    line = b"[" * 1_000_000 + b"]" * 1_000_000
    assert json_depth_exceeds(line, 8)
    # Within the limit the whole line is scanned, many times over, without recursion.
    assert not json_depth_exceeds(b"[" * 8 + b"]" * 8 + b"," + b"[[[[[[[[]]]]]]]]" * 100_000, 8)
    with pytest.raises(InvalidInput, match="nested deeper"):
        _validate(line + b"\n", chunk=1 << 20, max_line_bytes=4 << 20, max_bytes=8 << 20)


# ---------------------------------------------------------------------------------------
# Normalization and reading back
# ---------------------------------------------------------------------------------------
def test_conversation_from_row():
    assert conversation_from_row(AD, DatasetFormat.advertisegen) == [
        {"role": "user", "content": AD["content"]}, {"role": "assistant", "content": AD["summary"]}]
    extra = {"conversations": [{"role": "user", "content": "a", "loss": False},
                               {"role": "assistant", "content": "b"}]}
    assert conversation_from_row(extra, DatasetFormat.chatglm3) == [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert conversation_from_row(OAI, "openai")[1] == {"role": "assistant", "content": "hello"}
    with pytest.raises(InvalidInput):
        conversation_from_row({"content": "x"}, DatasetFormat.advertisegen)


def test_read_conversations(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_bytes(_jsonl(GLM, GLM) + b"\n")
    convs = list(read_conversations(p))
    assert len(convs) == 2 and convs[0][-1] == {"role": "assistant", "content": "hello"}
    p.write_bytes(_jsonl(GLM) + b'{"conversations": []}\n')
    with pytest.raises(InvalidInput, match="line 2"):
        list(read_conversations(p))


# ---------------------------------------------------------------------------------------
# `datasets` sources
# ---------------------------------------------------------------------------------------
def _load(src: DatasetSource, **kw):
    """Load a source directly under its dataset root (every local_data entry is)."""
    return load_dataset_source(src, allowed_roots=[Path(src.path).parent], **kw)


@pytest.fixture(scope="module")
def local_data(tmp_path_factory) -> Path:
    datasets = pytest.importorskip("datasets")
    root = tmp_path_factory.mktemp("datasets")
    rows = {"content": [f"类型#裙*颜色#{c}" for c in "红黄蓝绿紫"], "summary": [f"一条{c}色的裙子。" for c in "红黄蓝绿紫"],
            "extra": list(range(5))}
    ds = datasets.Dataset.from_dict(rows)
    ds.save_to_disk(str(root / "saved"))
    datasets.DatasetDict({"train": ds, "validation": ds.select(range(2))}).save_to_disk(str(root / "saved_dict"))
    ds.to_parquet(str(root / "adgen.parquet"))
    ds.to_json(str(root / "adgen.jsonl"), force_ascii=False)
    datasets.Dataset.from_dict({"q": ["a", "b"], "a": ["x", "y"]}).save_to_disk(str(root / "custom"))
    datasets.Dataset.from_dict({"messages": [OAI["messages"]] * 2}).save_to_disk(str(root / "chat"))
    datasets.Dataset.from_dict({"content": ["a", ""], "summary": ["x", "y"]}).save_to_disk(str(root / "holes"))
    return root


def test_load_saved_dataset_dir(local_data):
    convs = _load(DatasetSource(path=str(local_data / "saved")))
    assert len(convs) == 5
    assert convs[0] == [{"role": "user", "content": "类型#裙*颜色#红"}, {"role": "assistant", "content": "一条红色的裙子。"}]
    assert len(_load(DatasetSource(path=str(local_data / "saved"), split="train[:2]"))) == 2
    assert len(_load(DatasetSource(path=str(local_data / "saved"), split="train[40%:]"))) == 3
    assert len(_load(DatasetSource(path=str(local_data / "saved"), max_rows=4))) == 4


def test_load_saved_dataset_dict_splits(local_data):
    assert len(_load(DatasetSource(path=str(local_data / "saved_dict"), split="validation"))) == 2
    with pytest.raises(InvalidInput) as exc:
        _load(DatasetSource(path=str(local_data / "saved_dict"), split="test"))
    assert exc.value.param == "training_dataset.split"


@pytest.mark.parametrize("fname", ["adgen.parquet", "adgen.jsonl"])
def test_load_data_files(local_data, fname):
    convs = _load(DatasetSource(path=str(local_data / fname)))
    assert [c[1]["content"] for c in convs] == [f"一条{c}色的裙子。" for c in "红黄蓝绿紫"]
    assert len(_load(DatasetSource(path=str(local_data / fname), split="validation[:3]"))) == 3


def test_column_mapping_and_missing_column(local_data):
    convs = _load(DatasetSource(path=str(local_data / "custom"), content_column="q", summary_column="a"))
    assert convs == [[{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
                     [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}]]
    with pytest.raises(InvalidInput) as exc:
        _load(DatasetSource(path=str(local_data / "custom"), content_column="q"))
    assert exc.value.param == "training_dataset.summary_column" and "'summary'" in exc.value.message
    with pytest.raises(InvalidInput) as exc:
        _load(DatasetSource(path=str(local_data / "saved"), content_column="nope"),
                            param="validation_dataset")
    assert exc.value.param == "validation_dataset.content_column"
    with pytest.raises(InvalidInput) as exc:
        _load(DatasetSource(path=str(local_data / "holes")))
    assert exc.value.param == "training_dataset.content_column" and "row 1" in exc.value.message


def test_chat_format_dataset(local_data):
    convs = _load(DatasetSource(path=str(local_data / "chat")))
    assert convs == [OAI["messages"]] * 2


def test_missing_local_path(local_data):
    with pytest.raises(InvalidInput) as exc:
        _load(DatasetSource(path=str(local_data / "nope")))
    assert exc.value.param == "training_dataset.path"


def test_check_dataset_source(local_data, tmp_path):
    roots = [local_data]
    check_dataset_source(DatasetSource(path=str(local_data / "saved")), roots)
    check_dataset_source(DatasetSource(path=str(local_data / "adgen.parquet")), roots)
    check_dataset_source(DatasetSource(path="HasturOfficial/adgen"), roots)  # hub id: the worker loads it
    check_dataset_source(DatasetSource(path="squad"), roots)
    outside = tmp_path / "outside.parquet"
    outside.write_bytes(b"x")
    bad = [str(outside), "/etc/passwd", str(local_data / ".." / ".." / "x"), "../secret", "./local",
           "~/data", str(local_data / "missing"), "a/b/c", "owner/../name"]
    for path in bad:
        with pytest.raises(InvalidInput) as exc:
            check_dataset_source(DatasetSource(path=path), roots)
        assert exc.value.param == "training_dataset.path", path
    (local_data / "notes.txt").write_text("x")
    with pytest.raises(InvalidInput, match="unsupported file type"):
        check_dataset_source(DatasetSource(path=str(local_data / "notes.txt")), roots)
    with pytest.raises(InvalidInput) as exc:  # the worker re-checks when given the roots
        load_dataset_source(DatasetSource(path=str(outside)), allowed_roots=roots, param="validation_dataset")
    assert exc.value.param == "validation_dataset.path"


def test_read_conversations_refuses_a_lone_surrogate(tmp_path):
    # A file uploaded before the upload check existed: the worker refuses it with line and field.
    p = tmp_path / "old.jsonl"
    p.write_bytes(_jsonl(AD) + b'{"content": "a\\ud800", "summary": "b"}\n')
    with pytest.raises(InvalidInput, match="line 2: content holds a lone UTF-16 surrogate"):
        list(read_conversations(p))


# ---------------------------------------------------------------------------------------
# Dataset roots: everything the loader reads resolves inside them (issue 11)
# ---------------------------------------------------------------------------------------
SECRET = "SECRET_TOKEN_4f1c9a"


@pytest.fixture
def roots_and_secret(tmp_path) -> tuple[Path, Path]:
    """(a dataset root, a file outside it whose first line is a secret)."""
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "private"
    outside.mkdir()
    secret = outside / "secret.csv"
    secret.write_text(f"{SECRET},other_col\nx,y\n")
    return root, secret


def _refused(src: DatasetSource, root: Path, *, load: bool = False) -> InvalidInput:
    with pytest.raises(InvalidInput) as exc:
        if load:
            load_dataset_source(src, allowed_roots=[root])
        else:
            check_dataset_source(src, [root])
    assert exc.value.param == "training_dataset.path", exc.value.message
    assert SECRET not in exc.value.message
    return exc.value


@pytest.mark.parametrize("load", [False, True], ids=["api-check", "worker-load"])
def test_symlink_in_a_dir_inside_the_root_is_refused(roots_and_secret, load):
    root, secret = roots_and_secret
    d = root / "adgen"
    d.mkdir()
    (d / "train.csv").write_text("content,summary\na,b\n")
    (d / "validation.csv").symlink_to(secret)
    err = _refused(DatasetSource(path=str(d)), root, load=load)
    assert "validation.csv" in err.message and "outside" in err.message


@pytest.mark.parametrize("load", [False, True], ids=["api-check", "worker-load"])
def test_the_root_itself_holding_a_symlink_out_is_refused(roots_and_secret, load):
    root, secret = roots_and_secret
    (root / "train.csv").symlink_to(secret)
    _refused(DatasetSource(path=str(root)), root, load=load)
    _refused(DatasetSource(path=str(root / "train.csv")), root, load=load)  # named directly


def test_symlinked_dir_and_saved_metadata_leading_out_are_refused(roots_and_secret, local_data):
    root, secret = roots_and_secret
    d = root / "linked"
    d.mkdir()
    (d / "train.csv").write_text("content,summary\na,b\n")
    (d / "more").symlink_to(secret.parent, target_is_directory=True)
    assert "more" in _refused(DatasetSource(path=str(d)), root).message
    # A save_to_disk dir whose state.json names a file outside it (load_from_disk would join it).
    import shutil
    saved = root / "saved"
    shutil.copytree(local_data / "saved", saved)
    state = json.loads((saved / "state.json").read_text())
    state["_data_files"] = [{"filename": "../../private/secret.csv"}]
    (saved / "state.json").write_text(json.dumps(state))
    assert "metadata" in _refused(DatasetSource(path=str(saved)), root).message
    # A symlink loop inside the root is a 400, not a hang or a 500.
    (root / "loop").symlink_to(root / "loop")
    _refused(DatasetSource(path=str(root / "loop")), root)


def test_links_that_stay_inside_the_roots_are_fine(tmp_path, local_data):
    root = tmp_path / "root"
    (root / "real").mkdir(parents=True)
    (root / "real" / "train.jsonl").write_text(json.dumps({"content": "a", "summary": "b"}) + "\n")
    (root / "alias").symlink_to(root / "real", target_is_directory=True)
    (root / "alias2").symlink_to(root / "real", target_is_directory=True)  # the same dir twice: checked once
    (root / "real" / "again").symlink_to(root / "real", target_is_directory=True)  # a loop inside: pruned
    check_dataset_source(DatasetSource(path=str(root / "alias")), [root])
    assert load_dataset_source(DatasetSource(path=str(root / "alias")), allowed_roots=[root]) == [
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]]


def test_a_file_swapped_after_the_check_is_refused_at_read_time(roots_and_secret):
    """The API's check passed when the job was created; the worker resolves again before
    reading, so a file replaced by a link out afterwards is refused, and its content never shows."""
    root, secret = roots_and_secret
    d = root / "adgen"
    d.mkdir()
    train = d / "train.csv"
    train.write_text("content,summary\na,b\n")
    src = DatasetSource(path=str(d))
    check_dataset_source(src, [root])
    assert len(load_dataset_source(src, allowed_roots=[root])) == 1
    train.unlink()
    train.symlink_to(secret)
    _refused(src, root, load=True)
    # The same for a source that names the file itself.
    single = root / "one.csv"
    single.write_text("content,summary\na,b\n")
    check_dataset_source(DatasetSource(path=str(single)), [root])
    single.unlink()
    single.symlink_to(secret)
    _refused(DatasetSource(path=str(single)), root, load=True)


def test_errors_never_echo_file_contents(tmp_path):
    """A CSV's header is its first line: a missing column names the expected column only, and a
    malformed file's parser message (which quotes rows) stays in the worker log."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "cols.csv").write_text(f"{SECRET},other_col\nx,y\n")
    with pytest.raises(InvalidInput) as exc:
        load_dataset_source(DatasetSource(path=str(root / "cols.csv")), allowed_roots=[root])
    assert exc.value.param == "training_dataset.content_column"
    assert "'content'" in exc.value.message and "2 columns" in exc.value.message
    assert SECRET not in exc.value.message and "other_col" not in exc.value.message
    (root / "bad.csv").write_text(f"content,summary\na,b\n{SECRET},x,y,z\n")
    with pytest.raises(InvalidInput) as exc:
        load_dataset_source(DatasetSource(path=str(root / "bad.csv")), allowed_roots=[root])
    assert SECRET not in exc.value.message, exc.value.message


@pytest.mark.parametrize("name", ["a" * 256, "é" * 128], ids=["256-chars", "256-bytes"])
def test_os_errors_are_a_400_naming_the_field(tmp_path, name):
    """ENAMETOOLONG (a component over 255 bytes) used to escape as a 500."""
    root = tmp_path / "root"
    root.mkdir()
    for path in (root / name, root / name / "train.json", root / f"{name}.json"):
        with pytest.raises(InvalidInput) as exc:
            check_dataset_source(DatasetSource(path=str(path)), [root], param="validation_dataset")
        assert exc.value.param == "validation_dataset.path"
        assert "File name too long" in exc.value.message


def test_unreadable_dir_is_a_400(tmp_path):
    import os
    if os.geteuid() == 0:
        pytest.skip("root reads a mode-000 directory anyway; EACCES cannot be produced here")
    root = tmp_path / "root"
    (root / "d" / "locked").mkdir(parents=True)
    (root / "d" / "locked").chmod(0)
    try:
        with pytest.raises(InvalidInput) as exc:
            check_dataset_source(DatasetSource(path=str(root / "d")), [root])
        assert exc.value.param == "training_dataset.path" and "Permission denied" in exc.value.message
    finally:
        (root / "d" / "locked").chmod(0o755)
