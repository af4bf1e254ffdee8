"""User JSONL: accepted record shapes are normalised; every rejection names ``file:line``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from components.data.jsonl import (
    iter_jsonl,
    load_preference_file,
    load_sft_file,
    parse_preference_record,
    parse_sft_record,
    read_jsonl,
    write_jsonl,
)
from components.errors import DataError, MissingInputError


def _jsonl(tmp_path: Path, lines: list[object], name: str = "data.jsonl") -> Path:
    """Write ``lines``: dicts/lists are JSON-encoded, strings are written verbatim."""
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


# --------------------------------------------------------------------------- raw JSONL


def test_iter_jsonl_yields_objects_with_their_file_line_numbers(tmp_path):
    path = _jsonl(tmp_path, [{"a": 1}, "", "   ", {"b": 2}])
    assert list(iter_jsonl(path)) == [(1, {"a": 1}), (4, {"b": 2})]


def test_malformed_json_names_file_and_line(tmp_path):
    path = _jsonl(tmp_path, [{"prompt": "p", "completion": "c"}, "", '{"prompt": "p", "completion": '])
    with pytest.raises(DataError) as exc:
        read_jsonl(path)
    assert f"{path}:3:" in str(exc.value)  # the blank line 2 still counts
    assert "not valid JSON" in str(exc.value)


def test_non_object_line_names_file_and_line(tmp_path):
    path = _jsonl(tmp_path, [{"a": 1}, [1, 2]])
    with pytest.raises(DataError) as exc:
        read_jsonl(path)
    assert str(exc.value).startswith(f"{path}:2:")
    assert "list" in str(exc.value)


@pytest.mark.parametrize("line", ['"just a string"', "42", "null"])
def test_json_scalars_are_not_records(tmp_path, line):
    path = _jsonl(tmp_path, [line])
    with pytest.raises(DataError, match=r":1: expected a JSON object"):
        read_jsonl(path)


def test_missing_file_is_missing_input(tmp_path):
    path = tmp_path / "absent.jsonl"
    with pytest.raises(MissingInputError) as exc:
        read_jsonl(path)
    assert str(path) in str(exc.value)
    with pytest.raises(MissingInputError):
        load_sft_file(path)
    with pytest.raises(MissingInputError):
        load_preference_file(path)


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(MissingInputError):
        read_jsonl(tmp_path)


def test_write_then_read_round_trips_unicode(tmp_path):
    records = [{"prompt": "capital of Ærø", "answer": "Æ"}, {"n": [1, 2], "t": "naïve"}]
    path = tmp_path / "out.jsonl"
    write_jsonl(path, records)
    assert read_jsonl(path) == records
    assert len(path.read_text(encoding="utf-8").splitlines()) == 2  # one record per line
    assert "Ærø" in path.read_text(encoding="utf-8")  # written as UTF-8, not \u escapes


def test_invalid_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n')
    with pytest.raises(DataError, match=re.escape(f"{path}:2")):
        load_sft_file(path)


# --------------------------------------------------------------------------- SFT records


def test_sft_messages_ending_in_assistant_are_kept(tmp_path):
    messages = [{"role": "system", "content": "be brief"}, _user("hi"), _assistant("hello")]
    path = _jsonl(tmp_path, [{"messages": messages, "task": "greet"}])
    assert load_sft_file(path) == [{"messages": messages, "task": "greet"}]


def test_sft_prompt_completion_becomes_messages(tmp_path):
    path = _jsonl(tmp_path, [{"prompt": "add 1 and 2", "completion": "3"}])
    assert load_sft_file(path) == [{"messages": [_user("add 1 and 2"), _assistant("3")], "task": "user"}]


def test_sft_multi_turn_conversation(tmp_path):
    messages = [_user("a"), _assistant("b"), _user("c"), _assistant("d")]
    path = _jsonl(tmp_path, [{"messages": messages}, {"prompt": "x", "completion": "y"}])
    records = load_sft_file(path)
    assert [r["messages"] for r in records] == [messages, [_user("x"), _assistant("y")]]


@pytest.mark.parametrize(
    ("record", "fragment"),
    [
        ({"messages": [_user("hi")]}, "last message must be from the assistant"),
        ({"messages": [_user("hi"), _assistant("yo"), _user("again")]}, "last message"),
        ({"messages": [{"role": "system", "content": "s"}, _assistant("a")]}, "at least one user turn"),
        ({"messages": [{"role": "bot", "content": "x"}, _assistant("a")]}, "messages[0].role 'bot'"),
        ({"messages": [_user("hi"), {"role": "assistant"}]}, "messages[1].content must be a string"),
        ({"messages": [_user("hi"), {"role": "assistant", "content": 3}]}, "messages[1].content"),
        ({"messages": [_user("hi"), {"content": "x"}]}, "messages[1] must be an object"),
        ({"messages": [_user("hi"), {"role": "assistant", "content": "x", "name": "n"}]}, "messages[1]"),
        ({"messages": [_user("hi"), "assistant: x"]}, "messages[1] must be an object"),
        ({"messages": []}, "'messages' must be a non-empty list"),
        ({"messages": "hi"}, "'messages' must be a non-empty list"),
        ({"prompt": "only a prompt"}, "expected 'messages' or 'prompt' + 'completion'"),
        ({"completion": "only a completion"}, "expected 'messages' or 'prompt' + 'completion'"),
        ({"text": "pretraining style"}, "got keys ['text']"),
        ({"prompt": "", "completion": "c"}, "'prompt' must be a non-empty string"),
        ({"prompt": "p", "completion": "   "}, "'completion' must be a non-empty string"),
        ({"prompt": ["p"], "completion": "c"}, "'prompt' must be a non-empty string"),
    ],
)
def test_bad_sft_record_names_file_line_and_problem(tmp_path, record, fragment):
    good = {"prompt": "p", "completion": "c"}
    path = _jsonl(tmp_path, [good, good, record])
    with pytest.raises(DataError) as exc:
        load_sft_file(path)
    assert str(exc.value).startswith(f"{path}:3: ")
    assert fragment in str(exc.value)


def test_unhashable_role_names_file_and_line(tmp_path):
    path = _jsonl(tmp_path, [{"messages": [{"role": ["user"], "content": "x"}, _assistant("y")]}])
    with pytest.raises(DataError, match="^" + re.escape(f"{path}:1: ")):
        load_sft_file(path)


def test_sft_file_with_only_blank_lines_has_no_records(tmp_path):
    path = _jsonl(tmp_path, ["", "  "])
    with pytest.raises(DataError, match="no records"):
        load_sft_file(path)


def test_parse_sft_record_does_not_alias_input():
    messages = [_user("hi"), _assistant("yo")]
    out = parse_sft_record({"messages": messages}, "x:1")
    out["messages"][0]["content"] = "changed"
    assert messages[0]["content"] == "hi"


# --------------------------------------------------------------------------- preference records


def test_preference_string_form_becomes_conversational(tmp_path):
    path = _jsonl(tmp_path, [{"prompt": "reverse abc", "chosen": "cba", "rejected": "bca"}])
    assert load_preference_file(path) == [
        {
            "prompt": [_user("reverse abc")],
            "chosen": [_assistant("cba")],
            "rejected": [_assistant("bca")],
            "source": "user",
        }
    ]


def test_preference_conversational_form_is_kept(tmp_path):
    record = {
        "prompt": [{"role": "system", "content": "s"}, _user("q")],
        "chosen": [_assistant("good")],
        "rejected": [_assistant("bad")],
    }
    path = _jsonl(tmp_path, [record])
    assert load_preference_file(path) == [{**record, "source": "user"}]


def test_preference_mixed_forms(tmp_path):
    path = _jsonl(tmp_path, [{"prompt": [_user("q")], "chosen": "good", "rejected": [_assistant("bad")]}])
    (rec,) = load_preference_file(path)
    assert rec["chosen"] == [_assistant("good")] and rec["rejected"] == [_assistant("bad")]


@pytest.mark.parametrize(
    ("record", "fragment"),
    [
        ({"prompt": "q", "chosen": "same", "rejected": "same"}, "identical"),
        ({"prompt": "q", "chosen": [_assistant("s")], "rejected": "s"}, "identical"),
        ({"prompt": "q", "chosen": "a"}, "missing 'rejected'"),
        ({"chosen": "a", "rejected": "b"}, "missing 'prompt'"),
        ({"prompt": "q"}, "missing 'chosen', 'rejected'"),
        ({"prompt": "", "chosen": "a", "rejected": "b"}, "'prompt' must be a non-empty string"),
        ({"prompt": "q", "chosen": "", "rejected": "b"}, "'chosen' must be a non-empty string"),
        ({"prompt": "q", "chosen": "a", "rejected": []}, "'rejected' must be a non-empty list"),
        ({"prompt": "q", "chosen": 1, "rejected": "b"}, "'chosen' must be a non-empty list"),
        ({"prompt": [{"role": "human", "content": "q"}], "chosen": "a", "rejected": "b"}, "prompt[0].role"),
    ],
)
def test_bad_preference_record_names_file_line_and_problem(tmp_path, record, fragment):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    path = _jsonl(tmp_path, [good, "", record])
    with pytest.raises(DataError) as exc:
        load_preference_file(path)
    assert str(exc.value).startswith(f"{path}:3: ")
    assert fragment in str(exc.value)


def test_preference_file_with_no_records(tmp_path):
    path = _jsonl(tmp_path, [""])
    with pytest.raises(DataError, match="no records"):
        load_preference_file(path)


def test_parse_preference_record_uses_given_location():
    with pytest.raises(DataError, match=r"^mine\.jsonl:7: 'chosen' and 'rejected' are identical"):
        parse_preference_record({"prompt": "q", "chosen": "x", "rejected": "x"}, "mine.jsonl:7")
