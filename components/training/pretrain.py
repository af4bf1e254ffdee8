"""Causal-LM pretraining of the tiny base model on the shipped prose corpus.

Lives in ``training/`` so that models never import training: :mod:`components.models.tiny`
builds the tokenizer and the randomly initialised Llama, this module teaches it task content.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from transformers import (
    DataCollatorForLanguageModeling,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
)

from components.params import BaseConfig, ComputeConfig
from components.tracking import Tracker
from components.training.callbacks import TrackerCallback, trainer_args


def pack_blocks(texts: Sequence[str], tokenizer: PreTrainedTokenizerFast, block_size: int) -> list[list[int]]:
    """Concatenate lines (each ended by EOS) and cut the stream into equal blocks for causal-LM training."""
    stream: list[int] = []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(tokenizer.eos_token_id)
    return [stream[i : i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]


def pretrain(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    texts: Sequence[str],
    cfg: BaseConfig,
    tracker: Tracker,
    work_dir: Path,
    compute: ComputeConfig | None = None,
) -> list[dict[str, float]]:
    """Causal-LM pretraining with the transformers ``Trainer``; returns the logged loss history."""
    from datasets import Dataset

    blocks = pack_blocks(texts, tokenizer, cfg.pretrain_block_size)
    dataset = Dataset.from_dict({"input_ids": blocks})
    common = trainer_args(
        work_dir,
        seed=cfg.seed,
        learning_rate=cfg.pretrain_learning_rate,
        epochs=cfg.pretrain_epochs,
        batch_size=cfg.pretrain_batch_size,
        n_examples=len(blocks),
        has_eval=False,
        compute=compute,
    )
    args = TrainingArguments(**common, lr_scheduler_type="cosine", warmup_steps=10, weight_decay=0.0)
    callback = TrackerCallback(tracker, prefix="pretrain/")
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=[callback],
    )
    trainer.train()
    return callback.history
