"""The held-out suite every model is scored on, so base/sft/aligned/compressed compare like for like.

- ``accuracy``: exact match of the greedy answer (what a user gets at temperature 0);
- ``lenient_accuracy``: the greedy answer graded by :func:`~components.data.verifier.verify_lenient`,
  which also accepts the reference inside a verbose reply ("The answer is 109.") as long as the reply
  names no rival answer; never below ``accuracy``. Capitals' rivals are the capitals among the
  suite's own references, so grading depends only on the suite;
- ``sampled_accuracy`` and ``reward_mean``: exact match and graded verifier reward of samples at
  ``sample_temperature`` (what preference optimisation and RL move first);
- ``perplexity``: of the reference answers given the prompts (assistant tokens only).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from components.data.verifier import reward, verify, verify_lenient
from components.evaluation.generate import chat_prompt_ids, generate
from components.params import EvaluateConfig


def answer_sequences(
    tokenizer: PreTrainedTokenizerBase, records: Sequence[dict[str, str]]
) -> list[tuple[list[int], int]]:
    """(token ids of prompt + reference answer, number of prompt tokens) per record."""
    prompts = chat_prompt_ids(tokenizer, [r["prompt"] for r in records])
    out = []
    for rec, prompt_ids in zip(records, prompts, strict=True):
        full = tokenizer.apply_chat_template(
            [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec["answer"]}],
            tokenize=True,
            return_dict=False,
        )
        out.append((full, len(prompt_ids)))
    return out


@torch.no_grad()
def answer_perplexity(model: nn.Module, sequences: Sequence[tuple[list[int], int]]) -> float:
    """exp(mean NLL) of the answer tokens (and end marker) given the prompt."""
    nll, count = 0.0, 0
    for ids, n_prompt in sequences:
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
        targets = torch.tensor(ids[1:])
        losses = F.cross_entropy(logits, targets, reduction="none")[n_prompt - 1 :]
        nll += losses.sum().item()
        count += losses.numel()
    return math.exp(nll / max(count, 1))


def evaluate_policy(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[dict[str, str]],
    cfg: EvaluateConfig,
) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """Score one model on the suite: (metrics incl. per-task accuracy, every greedy answer)."""
    greedy = generate(
        model,
        tokenizer,
        [r["prompt"] for r in records],
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
    )
    sampled = generate(
        model,
        tokenizer,
        [r["prompt"] for r in records],
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.sample_temperature,
        num_return_sequences=cfg.n_samples,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
    )
    per_task: dict[str, list[bool]] = defaultdict(list)
    lenient: dict[str, list[bool]] = defaultdict(list)
    capitals = sorted({r["answer"] for r in records if r["task"] == "capital"})
    rewards: list[float] = []
    sampled_hits: list[bool] = []
    for rec, g, samples in zip(records, greedy, sampled, strict=True):
        per_task[rec["task"]].append(verify(g[0], rec["answer"]))
        lenient[rec["task"]].append(verify_lenient(g[0], rec["answer"], rec["task"], rec["prompt"], capitals))
        rewards.extend(reward(s, rec["answer"]) for s in samples)
        sampled_hits.extend(verify(s, rec["answer"]) for s in samples)
    hits = [h for task_hits in per_task.values() for h in task_hits]
    lenient_hits = [h for task_hits in lenient.values() for h in task_hits]
    metrics = {
        "accuracy": sum(hits) / len(hits),
        "sampled_accuracy": sum(sampled_hits) / len(sampled_hits),
        "reward_mean": sum(rewards) / len(rewards),
        "perplexity": answer_perplexity(model, answer_sequences(tokenizer, records)),
        "accuracy_by_task": {task: sum(v) / len(v) for task, v in sorted(per_task.items())},
        "lenient_accuracy": sum(lenient_hits) / len(lenient_hits),
        "lenient_accuracy_by_task": {task: sum(v) / len(v) for task, v in sorted(lenient.items())},
    }
    answers = [
        {"prompt": r["prompt"], "answer": r["answer"], "output": g[0]}
        for r, g in zip(records, greedy, strict=True)
    ]
    return metrics, answers
