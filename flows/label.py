"""``posttrain label``: a person as the preference source, in the terminal.

Shows a prompt and two candidate answers (in random order, so position tells nothing) and asks
which is better: ``1`` or ``2``, ``s`` to skip (a tie or can't tell: no pair is written), ``q``
to stop. Every choice is appended to the labels file as soon as it is made, one JSON line in
the import format (``prompt``/``chosen``/``rejected`` strings, plus ``source: human`` and the
pair's ``id``), flushed and fsynced, so Ctrl-C or a closed terminal loses nothing; skips go to
``<labels>.skipped`` (so the labels file stays importable as it is). Run it again and it
resumes: pairs already decided (labelled or skipped) are not shown again. A line cut off by a
crash mid-write is dropped on resume, and only that one.

The candidates are preference pairs (``data/preferences/train.jsonl`` by default: the verifier's
pairs, so the labels also say how often a person agrees with the verifier). Point
``ingest.preference_data`` at the labels file to train on them.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from components.data.jsonl import read_jsonl


def _text(turns: Any) -> str:
    """A TRL conversational field (list of turns) or a plain string, as text."""
    if isinstance(turns, str):
        return turns
    return "\n".join(str(t.get("content", "")) for t in turns)


def pair_id(prompt: str, a: str, b: str) -> str:
    """Order-free identity of a candidate pair: the same two answers to a prompt are one pair."""
    low, high = sorted((a, b))
    return hashlib.sha256(json.dumps([prompt, low, high]).encode()).hexdigest()[:16]


def candidates(path: Path | str) -> list[dict[str, str]]:
    """Distinct (prompt, answer, answer) candidates from a preference JSONL, with their ``id``."""
    out, seen = [], set()
    for rec in read_jsonl(path):
        prompt, a, b = _text(rec["prompt"]), _text(rec["chosen"]), _text(rec["rejected"])
        pid = pair_id(prompt, a, b)
        if a == b or pid in seen:
            continue
        seen.add(pid)
        out.append({"id": pid, "prompt": prompt, "a": a, "b": b, "verifier_chosen": a})
    return out


def skips_file(labels: Path) -> Path:
    return labels.with_name(labels.name + ".skipped")


def _ids(path: Path) -> set[str]:
    """Ids recorded in ``path``; a last line cut off mid-write is truncated away."""
    if not path.exists():
        return set()
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):  # a crash between write and newline: drop that line only
        keep = raw[: raw.rfind(b"\n") + 1]
        with path.open("r+b") as fh:
            fh.truncate(len(keep))
        raw = keep
    return {json.loads(line)["id"] for line in raw.decode().splitlines() if line.strip()}


def decided(labels: Path) -> set[str]:
    """Ids already labelled or skipped."""
    return _ids(labels) | _ids(skips_file(labels))


def append_label(labels: Path, record: dict[str, Any]) -> None:
    """One JSON line, written in one call, flushed and fsynced before the next question."""
    labels.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
    fd = os.open(labels, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def label(
    source: Path | str,
    labels: Path | str,
    *,
    seed: int = 0,
    ask: Callable[[str], str] = input,
    out: TextIO = sys.stdout,
) -> dict[str, int]:
    """Ask about every undecided candidate of ``source``; counts of this session's choices."""
    labels = Path(labels)
    done = decided(labels)
    todo = [c for c in candidates(source) if c["id"] not in done]
    counts = {"labelled": 0, "skipped": 0, "agree_with_verifier": 0, "remaining": len(todo)}
    rng = random.Random(seed)
    print(f"{len(done)} pairs already decided in {labels}; {len(todo)} to go. 1/2 = better answer, "
          "s = skip (tie), q = quit; Ctrl-C is safe.", file=out)  # fmt: skip
    for n, cand in enumerate(_shuffled(todo, rng), start=1):
        first, second = (cand["a"], cand["b"]) if rng.random() < 0.5 else (cand["b"], cand["a"])
        print(f"\n[{n}/{len(todo)}] {cand['prompt']}\n  1) {first}\n  2) {second}", file=out, flush=True)
        while (choice := ask("better [1/2/s/q]> ").strip().lower()) not in {"1", "2", "s", "q"}:
            print("  type 1, 2, s or q", file=out, flush=True)
        if choice == "q":
            break
        record: dict[str, Any] = {"id": cand["id"], "prompt": cand["prompt"], "source": "human"}
        if choice == "s":
            append_label(skips_file(labels), record)
            counts["skipped"] += 1
        else:
            chosen, rejected = (first, second) if choice == "1" else (second, first)
            append_label(labels, record | {"chosen": chosen, "rejected": rejected})
            counts["labelled"] += 1
            counts["agree_with_verifier"] += chosen == cand["verifier_chosen"]
        counts["remaining"] -= 1
    return counts


def _shuffled(items: Sequence[dict[str, str]], rng: random.Random) -> Iterator[dict[str, str]]:
    order = list(items)
    rng.shuffle(order)
    yield from order
