"""What a training stage reports about its PEFT method: what trained, what it cost, what it gives.

Every training stage (sft, reward_model, align) writes the same keys into its metrics, so
``posttrain compare peft`` can put methods side by side: ``peft_method``, ``trainable_params``,
``total_params``, ``trainable_share``, ``peak_memory_bytes``, ``train_seconds``, ``adapter_bytes``
(and ``eval_accuracy``, which each stage measures its own way).

``peak_memory_bytes`` is the process's peak: CUDA's allocator peak on a GPU, else the peak
resident set (``ru_maxrss``) of the stage process, which loads one model and trains it, so
it compares methods run as separate stages (``dvc exp run``), not within one process.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from components.data.verifier import reward, verify
from components.evaluation.generate import generate
from components.models.loading import dir_size
from components.peft.methods import TrainablePolicy, param_counts


def peak_memory_bytes() -> int:
    """This process's peak memory so far: CUDA's allocator peak on a GPU, else the peak RSS."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return int(torch.cuda.max_memory_allocated())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return int(peak if sys.platform == "darwin" else peak * 1024)


class Stopwatch:
    """``with Stopwatch() as watch: ...``; then ``watch.seconds``."""

    def __enter__(self) -> Stopwatch:
        self.started = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.started


def peft_report(policy: TrainablePolicy, out_dir: Path | str, seconds: float) -> dict[str, Any]:
    """The shared PEFT keys for a trained ``policy`` saved in ``out_dir``."""
    trainable, total = param_counts(policy.model)
    return {
        "peft_method": policy.method,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_share": trainable / total if total else float("nan"),
        "peak_memory_bytes": peak_memory_bytes(),
        "train_seconds": seconds,
        "adapter_bytes": dir_size(out_dir),
        **policy.facts,
    }


def greedy_scores(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[dict[str, str]],
    max_new_tokens: int,
    batch_size: int = 64,
) -> dict[str, float]:
    """``eval_accuracy`` (verifier exact match) and ``eval_reward`` (partial credit) of greedy answers."""
    if not records:
        return {}
    answers = generate(
        model, tokenizer, [r["prompt"] for r in records], max_new_tokens=max_new_tokens, batch_size=batch_size
    )
    refs = [r["answer"] for r in records]
    return {
        "eval_accuracy": sum(verify(a[0], ref) for a, ref in zip(answers, refs, strict=True)) / len(refs),
        "eval_reward": sum(reward(a[0], ref) for a, ref in zip(answers, refs, strict=True)) / len(refs),
        "n_eval_prompts": len(refs),
    }
