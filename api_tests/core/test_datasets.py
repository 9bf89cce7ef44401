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
    with pytest.raises(InvalidInput, match="line 2: line longer than 4096 bytes"):
        for _ in range(100):  # an endless line without newline: refused before it is all buffered
            v.feed(b"x" * 1000)
    assert len(v._buf) <= LIMITS["max_line_bytes"] + 1000


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
    convs = load_dataset_source(DatasetSource(path=str(local_data / "saved")))
    assert len(convs) == 5
    assert convs[0] == [{"role": "user", "content": "类型#裙*颜色#红"}, {"role": "assistant", "content": "一条红色的裙子。"}]
    assert len(load_dataset_source(DatasetSource(path=str(local_data / "saved"), split="train[:2]"))) == 2
    assert len(load_dataset_source(DatasetSource(path=str(local_data / "saved"), split="train[40%:]"))) == 3
    assert len(load_dataset_source(DatasetSource(path=str(local_data / "saved"), max_rows=4))) == 4


def test_load_saved_dataset_dict_splits(local_data):
    assert len(load_dataset_source(DatasetSource(path=str(local_data / "saved_dict"), split="validation"))) == 2
    with pytest.raises(InvalidInput) as exc:
        load_dataset_source(DatasetSource(path=str(local_data / "saved_dict"), split="test"))
    assert exc.value.param == "training_dataset.split"


@pytest.mark.parametrize("fname", ["adgen.parquet", "adgen.jsonl"])
def test_load_data_files(local_data, fname):
    convs = load_dataset_source(DatasetSource(path=str(local_data / fname)))
    assert [c[1]["content"] for c in convs] == [f"一条{c}色的裙子。" for c in "红黄蓝绿紫"]
    assert len(load_dataset_source(DatasetSource(path=str(local_data / fname), split="validation[:3]"))) == 3


def test_column_mapping_and_missing_column(local_data):
    convs = load_dataset_source(DatasetSource(path=str(local_data / "custom"), content_column="q", summary_column="a"))
    assert convs == [[{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
                     [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}]]
    with pytest.raises(InvalidInput) as exc:
        load_dataset_source(DatasetSource(path=str(local_data / "custom"), content_column="q"))
    assert exc.value.param == "training_dataset.summary_column" and "'summary'" in exc.value.message
    with pytest.raises(InvalidInput) as exc:
        load_dataset_source(DatasetSource(path=str(local_data / "saved"), content_column="nope"),
                            param="validation_dataset")
    assert exc.value.param == "validation_dataset.content_column"
    with pytest.raises(InvalidInput) as exc:
        load_dataset_source(DatasetSource(path=str(local_data / "holes")))
    assert exc.value.param == "training_dataset.content_column" and "row 1" in exc.value.message


def test_chat_format_dataset(local_data):
    convs = load_dataset_source(DatasetSource(path=str(local_data / "chat")))
    assert convs == [OAI["messages"]] * 2


def test_missing_local_path(local_data):
    with pytest.raises(InvalidInput) as exc:
        load_dataset_source(DatasetSource(path=str(local_data / "nope")))
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
