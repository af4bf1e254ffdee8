"""Preference collection: sample the policy, grade the samples, keep (better, worse) pairs.

Two graders: the verifier (:func:`build_pairs`, right against wrong) and a scalar judge such as
the trained reward model (:func:`judged_pairs`, best against worst, used by on-policy DPO rounds).

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


def judged_pairs(
    records: Sequence[dict[str, str]],
    samples: Sequence[Sequence[str]],
    scores: Sequence[Sequence[float]],
    tie_margin: float = 1e-6,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Pairs graded by a scalar judge (the reward model, or verifier + RM): best against worst answer.

    The verifier can only say right or wrong; a reward model ranks any two answers, so it can
    grade prompts the verifier cannot split (all right, all wrong) and tasks it cannot check.
    Per prompt, repeated texts are one candidate (``n_duplicates`` counts the repeats; a prompt
    left with one candidate is ``n_prompts_one_answer``), the
    highest-scoring candidate is chosen and the lowest rejected, and a prompt whose candidates
    all score within ``tie_margin`` gives no pair (``n_ties``): a tie teaches nothing. A pair
    that repeats an earlier one (same prompt, chosen and rejected) is dropped too.

    ``agreement`` is how far the judge can be trusted: of the pairs whose two answers the
    verifier's graded reward tells apart, the share where it prefers the judge's chosen answer
    (``n_verifiable`` of them; NaN when there are none).
    """
    if len(records) != len(samples) or any(len(o) != len(s) for o, s in zip(samples, scores, strict=True)):
        raise ValueError("judged_pairs: one score per sample, one sample list per record")
    pairs: list[dict[str, Any]] = []
    seen: set[tuple[str, str, str]] = set()
    n_samples = duplicates = single = ties = repeated = verifiable = agree = 0
    for rec, outs, marks in zip(records, samples, scores, strict=True):
        best: dict[str, float] = {}
        for text, mark in zip(outs, marks, strict=True):
            n_samples += 1
            if text in best:
                duplicates += 1
                continue
            best[text] = float(mark)
        if len(best) < 2:
            single += 1
            continue
        ranked = sorted(best, key=lambda t: best[t])  # stable: ties keep sampling order
        rejected, chosen = ranked[0], ranked[-1]
        if best[chosen] - best[rejected] <= tie_margin:
            ties += 1
            continue
        key = (rec["prompt"], chosen, rejected)
        if key in seen:
            repeated += 1
            continue
        seen.add(key)
        pairs.append(_pair(rec["prompt"], chosen, rejected, "judged", rec["task"]))
        right, wrong = reward(chosen, rec["answer"]), reward(rejected, rec["answer"])
        if right != wrong:
            verifiable += 1
            agree += right > wrong
    stats = {
        "n_prompts": len(records),
        "n_samples": n_samples,
        "n_pairs": len(pairs),
        "n_duplicates": duplicates,
        "n_prompts_one_answer": single,
        "n_ties": ties,
        "n_repeated_pairs": repeated,
        "n_verifiable": verifiable,
        "agreement": agree / verifiable if verifiable else float("nan"),
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
