"""Preference collection: sample the policy, grade with the verifier, keep (right, wrong) pairs.

A tiny policy is often all-right or all-wrong on a prompt, which yields no pair; ``k`` samples
at a high temperature widen the spread, and when every sample fails the reference answer may
stand in as ``chosen`` (counted separately as ``n_pairs_reference``, so nobody mistakes them
for on-policy pairs). The rejected answer is the policy's most frequent wrong answer: the
mistake it actually makes, which is what DPO should push down.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

from components.data.verifier import reward, verify


def _pair(prompt: str, chosen: str, rejected: str, source: str, task: str) -> dict[str, Any]:
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "source": source,
        "task": task,
    }


def build_pairs(
    records: Sequence[dict[str, str]], samples: Sequence[Sequence[str]], reference_as_chosen: bool
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Turn graded samples into TRL conversational preference pairs plus collection statistics."""
    pairs: list[dict[str, Any]] = []
    n_samples = n_correct = all_right = all_wrong = from_reference = 0
    for rec, outs in zip(records, samples, strict=True):
        right = [o for o in outs if verify(o, rec["answer"])]
        wrong = [o for o in outs if not verify(o, rec["answer"])]
        n_samples += len(outs)
        n_correct += len(right)
        if not wrong:
            all_right += 1
            continue
        # Most frequent mistake; ties broken by the lower partial-credit reward (the clearer error).
        counts = Counter(wrong)
        rejected = max(counts, key=lambda o: (counts[o], -reward(o, rec["answer"])))
        if right:
            pairs.append(
                _pair(rec["prompt"], Counter(right).most_common(1)[0][0], rejected, "sampled", rec["task"])
            )
            continue
        all_wrong += 1
        if reference_as_chosen:
            from_reference += 1
            pairs.append(_pair(rec["prompt"], rec["answer"], rejected, "reference", rec["task"]))
    stats = {
        "n_prompts": len(records),
        "n_pairs": len(pairs),
        "n_pairs_sampled": len(pairs) - from_reference,
        "n_pairs_reference": from_reference,
        "n_prompts_all_correct": all_right,
        "n_prompts_all_wrong": all_wrong,
        "sample_accuracy": n_correct / n_samples if n_samples else 0.0,
    }
    return pairs, stats


def trl_columns(pairs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Only the ``prompt``/``chosen``/``rejected`` columns TRL's preference trainers read."""
    return [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs]


def split_pairs(
    pairs: Sequence[dict[str, Any]], eval_fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Deterministic train/eval split (at least one eval pair when there are two or more pairs)."""
    shuffled = list(pairs)
    random.Random(seed).shuffle(shuffled)
    n_eval = round(len(shuffled) * eval_fraction)
    if len(shuffled) >= 2:
        n_eval = max(1, n_eval)
    return shuffled[n_eval:], shuffled[:n_eval]
