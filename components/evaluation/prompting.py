"""Prompting baselines: what the base and SFT models score with no weight change at all.

The lecture's alternative to post-training is a better prompt. Three styles, each graded on the
held-out suite with greedy decoding, exact and lenient:

- ``zero_shot``: the prompt alone (the suite's own question);
- ``few_shot``: ``k`` solved examples of the same task from the SFT train split as earlier
  user/assistant turns, then the question;
- ``cot``: the question plus an instruction to reason step by step and put the final answer on
  the last line; graded on that last line, with room for ``cot_max_new_tokens`` tokens.

A tiny model trained from scratch on terse prompts scores near zero here, which is honest; the
rows matter for a real instruct model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from components.data.verifier import verify, verify_lenient
from components.evaluation.generate import Prompt, generate

PROMPTINGS: tuple[str, ...] = ("zero_shot", "few_shot", "cot")
COT_INSTRUCTION = "Think step by step, then give only the final answer on the last line."


def shots_by_task(train: Sequence[dict[str, Any]], k: int) -> dict[str, list[tuple[str, str]]]:
    """The first ``k`` (question, answer) pairs of each task in the SFT train split."""
    out: dict[str, list[tuple[str, str]]] = {}
    for rec in train:
        user, reply = rec["messages"][-2]["content"], rec["messages"][-1]["content"]
        shots = out.setdefault(rec.get("task", "user"), [])
        if len(shots) < k:
            shots.append((user, reply))
    return out


def prompt_for(style: str, record: dict[str, str], shots: dict[str, list[tuple[str, str]]]) -> Prompt:
    """The conversation ``style`` asks ``record``'s question with."""
    if style == "zero_shot":
        return record["prompt"]
    if style == "cot":
        return f"{record['prompt']}\n{COT_INSTRUCTION}"
    if style == "few_shot":
        turns: list[dict[str, str]] = []
        for question, answer in shots.get(record["task"], []):
            turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return [*turns, {"role": "user", "content": record["prompt"]}]
    raise ValueError(f"unknown prompting style {style!r} (known: {', '.join(PROMPTINGS)})")


def final_line(text: str) -> str:
    """The last non-empty line of a reply (where ``cot`` asks for the answer)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def prompting_baselines(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[dict[str, str]],
    shots: dict[str, list[tuple[str, str]]],
    styles: Sequence[str],
    *,
    max_new_tokens: int,
    cot_max_new_tokens: int,
    batch_size: int,
) -> dict[str, dict[str, float]]:
    """Greedy exact and lenient accuracy of ``model`` under each prompting style."""
    capitals = sorted({r["answer"] for r in records if r["task"] == "capital"})
    out: dict[str, dict[str, float]] = {}
    for style in styles:
        replies = generate(
            model,
            tokenizer,
            [prompt_for(style, r, shots) for r in records],
            max_new_tokens=cot_max_new_tokens if style == "cot" else max_new_tokens,
            batch_size=batch_size,
        )
        answers = [final_line(r[0]) if style == "cot" else r[0] for r in replies]
        exact = [verify(a, r["answer"]) for a, r in zip(answers, records, strict=True)]
        lenient = [
            verify_lenient(a, r["answer"], r["task"], r["prompt"], capitals)
            for a, r in zip(answers, records, strict=True)
        ]
        out[style] = {"accuracy": sum(exact) / len(exact), "lenient_accuracy": sum(lenient) / len(lenient)}
    return out
