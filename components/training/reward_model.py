"""Reward model: TRL ``RewardTrainer`` (Bradley-Terry) on a sequence-classification head.

The RM starts from the SFT policy's merged weights: it already reads the chat format and the
task content, so only the scalar head and a light fine-tune are needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from trl import RewardConfig, RewardTrainer

from components.data.preferences import trl_columns
from components.errors import DataError
from components.models.loading import load_sequence_classifier, load_tokenizer
from components.params import ComputeConfig, RewardModelConfig
from components.peft.adapters import (
    adapter_base,
    check_base,
    is_adapter,
    load_trainable,
    plain_weights,
    save_policy,
)
from components.peft.methods import TrainablePolicy
from components.tracking import Tracker
from components.training.callbacks import TrackerCallback, trainer_args
from components.training.checkpoints import resume_or_train


def load_reward_model(path: Path | str, merge: bool = True) -> PreTrainedModel:
    """The RM at ``path``: full weights, or an adapter (``reward_model.peft``) merged in fp32 over its
    base policy with the trained scalar head (``merge=False``: the adapter left attached)."""
    if is_adapter(path):
        from peft import PeftModel

        base = Path(adapter_base(path))
        check_base(path, base)
        with plain_weights(base) as plain:
            backbone = load_sequence_classifier(plain)
        backbone.config.pad_token_id = load_tokenizer(path).pad_token_id
        model = PeftModel.from_pretrained(backbone, str(path))
        model = model.merge_and_unload() if merge else model
    else:
        model = load_sequence_classifier(path)
    model.eval()
    return model


@torch.no_grad()
def score(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[list[dict[str, str]]],
    batch_size: int = 64,
) -> list[float]:
    """Scalar rewards for full conversations, tokenised exactly as ``RewardTrainer`` does."""
    rewards: list[float] = []
    pad = tokenizer.pad_token_id
    for start in range(0, len(conversations), batch_size):
        batch = [
            tokenizer.apply_chat_template(c, tokenize=True, return_dict=False)
            for c in conversations[start : start + batch_size]
        ]
        width = max(len(x) for x in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(batch):  # right padding: the head reads the last non-pad token
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        rewards.extend(model(input_ids=ids, attention_mask=mask).logits[:, 0].tolist())
    return rewards


def pairwise_accuracy(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: Sequence[dict[str, Any]]
) -> float:
    """Share of pairs whose chosen conversation scores above the rejected one."""
    if not pairs:
        return float("nan")
    chosen = score(model, tokenizer, [p["prompt"] + p["chosen"] for p in pairs])
    rejected = score(model, tokenizer, [p["prompt"] + p["rejected"] for p in pairs])
    return sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(pairs)


def train_reward_model(
    cfg: RewardModelConfig,
    policy_dir: Path,
    train_pairs: Sequence[dict[str, Any]],
    eval_pairs: Sequence[dict[str, Any]],
    out_dir: Path,
    tracker: Tracker,
    work_dir: Path,
    compute: ComputeConfig | None = None,
) -> tuple[list[dict[str, float]], TrainablePolicy]:
    """Train the RM from the (merged) SFT policy and save it to ``out_dir``; (history, trained policy).

    ``reward_model.peft``: a full fine-tune (default), or an adapter (lora, dora, qlora) over the
    SFT policy with a trained scalar head (PEFT's ``modules_to_save: [score]``)."""
    if len(train_pairs) < 2:
        # RewardTrainer dies with a bare StopIteration on an empty dataset.
        raise DataError(f"reward model needs at least 2 training pairs, got {len(train_pairs)}")
    tokenizer = load_tokenizer(policy_dir)
    common = trainer_args(
        work_dir,
        seed=cfg.seed,
        learning_rate=cfg.learning_rate,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        n_examples=len(train_pairs),
        has_eval=bool(eval_pairs),
        compute=compute,
        resumable=True,
    )  # seeds before the reward head is initialised
    policy = load_trainable(
        policy_dir, cfg.peft, "reward_model.peft", compute=compute, reward_head=True, seed=cfg.seed,
        scratch=work_dir.parent,
    )  # fmt: skip
    model = policy.model
    model.config.pad_token_id = tokenizer.pad_token_id
    args = RewardConfig(**common, **policy.optimizer_args(), max_length=cfg.max_length)
    callback = TrackerCallback(tracker, prefix="reward_model/")
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(trl_columns(train_pairs)),
        eval_dataset=Dataset.from_list(trl_columns(eval_pairs)) if eval_pairs else None,
        processing_class=tokenizer,
        peft_config=policy.peft_config,
        callbacks=[callback],
    )
    policy.settle(trainer)
    resume_or_train(trainer)
    save_policy(trainer.model, tokenizer, out_dir, policy_dir, cfg.peft)
    policy.model = trainer.model
    return callback.history, policy
