"""The rewards online alignment maximises: the verifier, the trained reward model, or both.

``align.reward`` picks one:

- ``verifier``: :func:`components.data.verifier.reward`, 1 for an exact answer, else partial
  credit for position-matched characters (a signal on near misses); with
  ``align.partial_credit: false`` it is 1 or 0 (exact match only; on a real model a near-miss
  sum such as 119 for 109 otherwise earns a third of a right one);
- ``rm``: the Bradley-Terry reward model from the ``reward_model`` stage, scoring the whole
  conversation exactly as ``RewardTrainer`` tokenised it;
- ``both``: ``verifier + rm_weight * rm``.

Every method sees the same :class:`RewardFunction`: ``(prompt records, completions) -> scores``,
where a record holds the ``prompt`` and its reference ``answer``. A reward model that returns
NaN stops training with a clear error instead of poisoning the update.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from components.data.verifier import reward as verifier_reward
from components.data.verifier import verify
from components.errors import DataError

REWARDS: tuple[str, ...] = ("verifier", "rm", "both")


class RewardFunction:
    """Scores completions of prompt records; ``name`` is what TRL logs it as (``rewards/<name>``)."""

    def __init__(
        self,
        kind: str,
        rm_dir: Path | str | None = None,
        rm_weight: float = 1.0,
        partial_credit: bool = True,
    ) -> None:
        if kind not in REWARDS:
            raise ValueError(f"unknown reward {kind!r} (known: {', '.join(REWARDS)})")
        self.kind = kind
        self.rm_weight = rm_weight
        self.partial_credit = partial_credit
        self.__name__ = f"{kind}_reward"  # TRL names reward functions by __name__
        self._rm: Any = None
        self._rm_tokenizer: Any = None
        if kind != "verifier":
            if rm_dir is None:
                raise ValueError(f"reward {kind!r} needs the reward model directory")
            from components.models.loading import load_tokenizer, require_dir
            from components.training.reward_model import load_reward_model

            rm_dir = require_dir(rm_dir, "reward model")
            self._rm, self._rm_tokenizer = load_reward_model(rm_dir), load_tokenizer(rm_dir)

    def rm_scores(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        from components.training.reward_model import score

        conversations = [
            [{"role": "user", "content": p}, {"role": "assistant", "content": c}]
            for p, c in zip(prompts, completions, strict=True)
        ]
        scores = score(self._rm, self._rm_tokenizer, conversations)
        bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
        if bad:
            raise DataError(
                f"the reward model returned {scores[bad[0]]} for {len(bad)} of {len(scores)} completions "
                f"(first: prompt {prompts[bad[0]]!r}, completion {completions[bad[0]]!r}); "
                "retrain it (reward_model stage) or set align.reward: verifier"
            )
        return scores

    def __call__(self, records: Sequence[dict[str, str]], completions: Sequence[str]) -> list[float]:
        scores = [0.0] * len(completions)
        if self.kind in ("verifier", "both"):
            grade = verifier_reward if self.partial_credit else lambda c, a: float(verify(c, a))
            scores = [grade(c, r["answer"]) for r, c in zip(records, completions, strict=True)]
        if self.kind in ("rm", "both"):
            weight = 1.0 if self.kind == "rm" else self.rm_weight
            rm = self.rm_scores([r["prompt"] for r in records], completions)
            scores = [s + weight * x for s, x in zip(scores, rm, strict=True)]
        return scores

    def trl(self) -> Any:
        """The same reward in TRL's reward-function signature (conversational prompts and completions)."""

        def reward_func(prompts: list, completions: list, answer: list[str], **_: Any) -> list[float]:
            records = [
                {"prompt": p[-1]["content"], "answer": a} for p, a in zip(prompts, answer, strict=True)
            ]
            return self(records, [c[0]["content"].strip() for c in completions])

        reward_func.__name__ = self.__name__
        return reward_func
