"""Read and validate user JSONL: every problem names the file and the line.

Accepted SFT records: chat ``{"messages": [{"role": ..., "content": ...}, ...]}`` ending in an
assistant turn, or ``{"prompt": str, "completion": str}``. Accepted preference records:
``{"prompt", "chosen", "rejected"}`` as strings, or in TRL's conversational form (lists of turns).
Everything is normalised to the conversational form the trainers and the chat template use.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from components.errors import DataError, MissingInputError

ROLES = {"system", "user", "assistant"}


def parse_jsonl_lines(lines: Iterable[str | bytes], name: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` from raw lines; errors are ``DataError("name:line: ...")``.

    Blank lines are skipped; every other line must be a UTF-8 JSON object.
    """
    for number, raw in enumerate(lines, start=1):
        try:
            line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        except UnicodeDecodeError as exc:
            raise DataError(f"{name}:{number}: not valid UTF-8 (byte {exc.start})") from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{name}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{name}:{number}: expected a JSON object, got {type(obj).__name__}")
        yield number, obj


def iter_jsonl(path: Path | str) -> Iterator[tuple[int, dict[str, Any]]]:
    """:func:`parse_jsonl_lines` over a file; a missing file is a :class:`MissingInputError`."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: file not found")
    with path.open("rb") as fh:
        yield from parse_jsonl_lines(fh, str(path))


def write_jsonl(path: Path | str, records: list[dict[str, Any]]) -> None:
    with Path(path).open("w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")


def read_jsonl(path: Path | str) -> list[dict[str, Any]]:
    return [obj for _, obj in iter_jsonl(path)]


def _turns(value: Any, where: str, field: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: '{field}' must be a non-empty list of turns")
    for i, turn in enumerate(value):
        if not isinstance(turn, dict) or set(turn) - {"role", "content"} or "role" not in turn:
            raise DataError(f"{where}: {field}[{i}] must be an object with 'role' and 'content'")
        if not isinstance(turn["role"], str) or turn["role"] not in ROLES:
            raise DataError(f"{where}: {field}[{i}].role {turn['role']!r} is not one of {sorted(ROLES)}")
        if not isinstance(turn.get("content"), str):
            raise DataError(f"{where}: {field}[{i}].content must be a string")
    return [{"role": t["role"], "content": t["content"]} for t in value]


def _text(value: Any, where: str, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: '{field}' must be a non-empty string")
    return value


def parse_sft_record(obj: dict[str, Any], where: str) -> dict[str, Any]:
    """Normalise one SFT record to ``{"messages": [...], "task": "user"}``."""
    if "messages" in obj:
        messages = _turns(obj["messages"], where, "messages")
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be from the assistant")
        if not any(m["role"] == "user" for m in messages):
            raise DataError(f"{where}: 'messages' needs at least one user turn")
    elif "prompt" in obj and "completion" in obj:
        messages = [
            {"role": "user", "content": _text(obj["prompt"], where, "prompt")},
            {"role": "assistant", "content": _text(obj["completion"], where, "completion")},
        ]
    else:
        raise DataError(f"{where}: expected 'messages' or 'prompt' + 'completion', got keys {sorted(obj)}")
    return {"messages": messages, "task": str(obj.get("task", "user"))}


def parse_preference_record(obj: dict[str, Any], where: str) -> dict[str, Any]:
    """Normalise one preference record to TRL's conversational ``prompt``/``chosen``/``rejected``."""
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in obj]
    if missing:
        raise DataError(f"{where}: missing {', '.join(repr(m) for m in missing)}")
    if isinstance(obj["prompt"], str):
        prompt = [{"role": "user", "content": _text(obj["prompt"], where, "prompt")}]
    else:
        prompt = _turns(obj["prompt"], where, "prompt")
    out: dict[str, Any] = {"prompt": prompt, "source": "user"}
    for key in ("chosen", "rejected"):
        value = obj[key]
        if isinstance(value, str):
            out[key] = [{"role": "assistant", "content": _text(value, where, key)}]
        else:
            out[key] = _turns(value, where, key)
    if out["chosen"] == out["rejected"]:
        raise DataError(f"{where}: 'chosen' and 'rejected' are identical")
    return out


def load_sft_file(path: Path | str) -> list[dict[str, Any]]:
    records = [parse_sft_record(obj, f"{path}:{n}") for n, obj in iter_jsonl(path)]
    if not records:
        raise DataError(f"{path}: no records")
    return records


def load_preference_file(path: Path | str) -> list[dict[str, Any]]:
    records = [parse_preference_record(obj, f"{path}:{n}") for n, obj in iter_jsonl(path)]
    if not records:
        raise DataError(f"{path}: no records")
    return records
