"""Supervised fine-tuning with TRL's ``SFTTrainer``: chat messages, assistant-only loss, LoRA by default."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset
from trl import SFTConfig as TRLSFTConfig
from trl import SFTTrainer

from components.models.loading import load_tokenizer
from components.params import ComputeConfig, SFTConfig
from components.peft.adapters import load_policy, lora_config, save_policy
from components.tracking import Tracker
from components.training.callbacks import TrackerCallback, trainer_args


def _messages(records: Sequence[dict[str, Any]]) -> Dataset:
    return Dataset.from_list([{"messages": r["messages"]} for r in records])


def train_sft(
    cfg: SFTConfig,
    base_dir: Path,
    train_records: Sequence[dict[str, Any]],
    eval_records: Sequence[dict[str, Any]],
    out_dir: Path,
    tracker: Tracker,
    work_dir: Path,
    compute: ComputeConfig | None = None,
) -> list[dict[str, float]]:
    """Train and save the SFT policy (a LoRA adapter over ``base_dir``, or full weights)."""
    tokenizer = load_tokenizer(base_dir)
    model = load_policy(base_dir)
    common = trainer_args(
        work_dir,
        seed=cfg.seed,
        learning_rate=cfg.learning_rate,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        n_examples=len(train_records),
        has_eval=bool(eval_records),
        compute=compute,
    )
    args = TRLSFTConfig(
        **common,
        max_length=cfg.max_length,
        assistant_only_loss=True,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_steps,
    )
    callback = TrackerCallback(tracker, prefix="sft/")
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=_messages(train_records),
        eval_dataset=_messages(eval_records) if eval_records else None,
        processing_class=tokenizer,
        peft_config=lora_config(cfg.peft),
        callbacks=[callback],
    )
    trainer.train()
    save_policy(trainer.model, tokenizer, out_dir, base_dir)
    return callback.history
