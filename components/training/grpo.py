"""Group-baseline online RL through TRL: GRPOTrainer (``align.method: grpo``) and RLOOTrainer (``rloo``).

Both sample ``num_generations`` completions per prompt from the current policy, score them
with :class:`~components.training.rewards.RewardFunction`, and use the group as its own
baseline, so neither needs a value model:

- GRPO: advantage = (reward - group mean), scaled per ``scale_rewards``; ``loss_type`` picks how
  token losses are aggregated (``dapo``, ``dr_grpo``, ``grpo``, ...); ``beta`` weighs a KL term.
- RLOO: advantage = reward - mean of the *other* completions of the prompt (leave one out);
  ``beta`` folds the KL into the reward, as in the RLOO paper.

The policy is the merged SFT model with a fresh LoRA adapter; with ``beta > 0`` TRL computes
the reference log-probs with the adapter disabled, i.e. exactly the SFT policy. Generation is
plain ``transformers`` (no vLLM), stopping at the chat template's end-of-turn token.

A group whose completions all score alike has advantage 0 everywhere, and with the ``dapo`` (or
``cispo``) loss and ``beta = 0`` such a completion adds exactly nothing to the gradient: the
loss is a sum over tokens divided by the token count of the whole generation batch, which TRL
computes before the loss pass. GRPO therefore skips those rows in its forward and backward pass
(:func:`informative_rows`): the same update for less compute. With the exact-match verifier about
half of the groups are uniform (all right or all wrong); a default run's steps cost about a fifth
less on 2 cores. TRL's per-step ``entropy`` and clip ratios then cover the informative
completions only (``frac_reward_zero_std`` still counts every group).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import PeftModel
from transformers import PreTrainedTokenizerBase
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from components.params import ComputeConfig, GRPOSettings, PeftConfig, RLOOSettings
from components.peft.adapters import load_trainable
from components.tracking import Tracker
from components.training.callbacks import TrackerCallback, trainer_args
from components.training.checkpoints import resume_or_train
from components.training.rewards import RewardFunction


def prompt_dataset(records: Sequence[dict[str, str]]) -> Dataset:
    """TRL's conversational prompt format; ``answer`` rides along to the reward function."""
    return Dataset.from_list(
        [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in records]
    )


# GRPO losses whose gradient ignores a zero-advantage completion exactly (with beta = 0): a sum
# over tokens divided by the generation batch's token count, fixed before the loss pass
EXACT_SKIP_LOSSES = ("dapo", "cispo")


def informative_rows(inputs: dict[str, Any]) -> dict[str, Any]:
    """``inputs`` without the completions whose advantage is exactly 0 (at least one row is kept).

    Every per-completion tensor (first dimension = number of completions) is filtered; scalars
    such as ``num_items_in_batch`` (the loss normaliser) are kept as they are.
    """
    keep = inputs["advantages"] != 0
    if keep.all():
        return inputs
    if not keep.any():
        keep[0] = True  # one row, whose loss and gradient are 0, keeps the step well-formed
    n = keep.numel()
    return {
        k: v[keep] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v
        for k, v in inputs.items()
    }


class InformativeGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer whose loss pass skips zero-advantage completions (same update, less compute)."""

    def _prepare_inputs(self, generation_batch: dict[str, Any]) -> dict[str, Any]:
        inputs = super()._prepare_inputs(generation_batch)
        return informative_rows(inputs) if self.model.training else inputs


def train_group_rl(
    method: str,
    settings: GRPOSettings | RLOOSettings,
    peft: PeftConfig,
    seed: int,
    policy_dir: Path,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[dict[str, str]],
    reward: RewardFunction,
    tracker: Tracker,
    work_dir: Path,
    compute: ComputeConfig | None = None,
) -> tuple[PeftModel, list[dict[str, float]]]:
    """Train with TRL's GRPO or RLOO for ``settings.steps`` steps; (adapter model, history)."""
    s = settings
    completions_per_step = s.prompts_per_step * s.num_generations
    common = trainer_args(
        work_dir,
        seed=seed,
        learning_rate=s.learning_rate,
        epochs=1,
        batch_size=completions_per_step,  # TRL counts completions, not prompts
        n_examples=s.steps * completions_per_step,
        has_eval=False,
        compute=compute,
        resumable=True,
    )
    policy = load_trainable(
        policy_dir, peft, "align.peft", compute=compute, seed=seed, scratch=work_dir.parent
    )
    shared: dict[str, Any] = {
        **common,
        **policy.optimizer_args(),
        "max_steps": s.steps,
        "lr_scheduler_type": "constant",
        "num_generations": s.num_generations,
        "steps_per_generation": s.steps_per_generation,
        "max_completion_length": s.max_new_tokens,
        "temperature": s.temperature,
        "top_p": 1.0,
        "top_k": 0,
        "beta": s.beta,
    }
    if method == "grpo":
        assert isinstance(s, GRPOSettings)
        args: GRPOConfig | RLOOConfig = GRPOConfig(
            **shared, loss_type=s.loss_type, scale_rewards=s.scale_rewards, epsilon=s.epsilon
        )
        exact_skip = s.beta == 0 and s.loss_type in EXACT_SKIP_LOSSES
        trainer_cls: type = InformativeGRPOTrainer if exact_skip else GRPOTrainer
    else:
        args = RLOOConfig(**shared)
        trainer_cls = RLOOTrainer
    callback = TrackerCallback(tracker, prefix="align/")
    if peft.method == "full" and s.beta > 0:
        # TRL builds a full fine-tune's KL reference by re-loading config._name_or_path, which for a
        # merged adapter chain names the *base* model: point it at a saved copy of the SFT policy.
        reference = work_dir / "reference"
        policy.model.save_pretrained(str(reference), safe_serialization=True)
        policy.model.config._name_or_path = str(reference)
    trainer = trainer_cls(
        model=policy.model,
        reward_funcs=reward.trl(),
        args=args,
        train_dataset=prompt_dataset(records),
        processing_class=tokenizer,
        peft_config=policy.peft_config,
        callbacks=[callback],
    )
    policy.settle(trainer)
    resume_or_train(trainer)
    return trainer.model, callback.history
