"""Supervised fine-tuning with TRL's ``SFTTrainer``: chat messages, assistant-only loss, LoRA by default."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset
from trl import SFTConfig as TRLSFTConfig
from trl import SFTTrainer

from components.models.loading import load_tokenizer
from components.params import SFTConfig
from components.peft.adapters import load_policy, lora_config, set_adapter_base
from components.tracking import Tracker
from components.training.callbacks import TrackerCallback, logging_steps


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
) -> list[dict[str, float]]:
    """Train and save the SFT policy (a LoRA adapter over ``base_dir``, or full weights)."""
    tokenizer = load_tokenizer(base_dir)
    model = load_policy(base_dir)
    args = TRLSFTConfig(
        output_dir=str(work_dir),
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        max_length=cfg.max_length,
        assistant_only_loss=True,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_steps,
        logging_steps=logging_steps(len(train_records), cfg.batch_size, cfg.epochs),
        eval_strategy="epoch" if eval_records else "no",
        save_strategy="no",
        report_to=[],
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=True,
        dataloader_num_workers=0,
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
    trainer.model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    if cfg.peft.method != "none":
        set_adapter_base(out_dir, base_dir)
    return callback.history
