"""Supervised fine-tuning with TRL's ``SFTTrainer``: chat messages, assistant-only loss, LoRA by default.

Assistant-only loss works with any prefix-preserving chat template, with no ``{% generation %}``
markers needed: each conversation is split the way TRL's prompt-completion format is (the last
assistant turn is the completion, everything before it the prompt) and tokenized here, and the
loss covers the tokens the full conversation adds after the prompt rendered with its generation
prompt, up to and including the turn's end-of-turn token (the tokenizer's eos, or a
generation-config eos). Whatever a template writes after that token (ChatML's newline) stays in
the sequence but out of the loss, so the mask is exactly the reply and its end marker, as
TRL's ``assistant_only_loss`` marks it for a template that has ``{% generation %}``. TRL then
gets ``input_ids`` + ``completion_mask`` with ``completion_only_loss=True`` (TRL appends no
EOS to conversational data; the template's own end-of-turn token is what the model learns to stop on).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers import PreTrainedTokenizerBase
from trl import SFTConfig as TRLSFTConfig
from trl import SFTTrainer

from components.errors import PosttrainError
from components.models.loading import load_tokenizer
from components.params import ComputeConfig, SFTConfig
from components.peft.adapters import load_trainable, new_token_ids, save_policy
from components.peft.methods import TrainablePolicy
from components.tracking import Tracker
from components.training.callbacks import TrackerCallback, trainer_args
from components.training.checkpoints import resume_or_train


class ChatTemplateError(PosttrainError):
    """The base model's chat template cannot give an assistant-only loss."""


def split_prompt_completion(messages: Sequence[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    """TRL's conversational prompt-completion form: (turns before the last assistant turn, [that turn])."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise ChatTemplateError("an SFT record has no assistant turn (ingest validates this: re-run ingest)")
    return list(messages[:last]), [dict(messages[last])]


def _ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation_prompt: bool) -> list[int]:
    return list(
        tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=False, add_generation_prompt=generation_prompt
        )
    )


def completion_example(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[dict[str, Any]],
    stop_ids: set[int],
    model_name: str = "",
    max_length: int | None = None,
) -> dict[str, list[int]]:
    """``input_ids`` of the conversation and a ``completion_mask`` of exactly reply + end-of-turn token.

    ``max_length`` truncates both from the end, as TRL's ``truncation_mode="keep_start"`` would
    (done here so padded and padding-free batches see the very same tokens).

    Raises :class:`ChatTemplateError` (one line, naming ``base.model``) when the template does not
    render the prompt as a prefix of the conversation, or ends the reply with no stop token.
    """
    prompt, completion = split_prompt_completion(messages)
    prompt_ids = _ids(tokenizer, prompt, True)
    ids = _ids(tokenizer, prompt + completion, False)
    where = f"base.model {model_name!r}" if model_name else "base.model"
    if ids[: len(prompt_ids)] != prompt_ids or len(ids) == len(prompt_ids):
        raise ChatTemplateError(
            f"{where}: its chat template does not render the prompt (with add_generation_prompt) as a "
            "prefix of the prompt + assistant reply, so the reply's tokens cannot be found; fix: give the "
            "tokenizer a prefix-preserving chat_template (tokenizer_config.json / chat_template.jinja)"
        )
    tail = ids[len(prompt_ids) :]
    ends = [i for i, t in enumerate(tail) if t in stop_ids]
    if not ends:
        raise ChatTemplateError(
            f"{where}: its chat template ends the assistant turn with no eos token "
            f"({sorted(stop_ids)}), so the model would never learn to stop; fix: set the tokenizer's "
            "eos_token to the template's end-of-turn token"
        )
    n_loss = ends[-1] + 1
    mask = [0] * len(prompt_ids) + [1] * n_loss + [0] * (len(tail) - n_loss)
    return {"input_ids": ids[:max_length], "completion_mask": mask[:max_length]}


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, model: Any) -> set[int]:
    """The tokenizer's eos id and every eos id of the model's generation config."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    ids |= set(eos) if isinstance(eos, list | tuple) else ({eos} if eos is not None else set())
    return ids


def completion_dataset(
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[dict[str, Any]],
    stop_ids: set[int],
    model_name: str = "",
    max_length: int | None = None,
) -> Dataset:
    """Tokenized prompt-completion examples (TRL takes them as is: ``input_ids`` present)."""
    return Dataset.from_list(
        [completion_example(tokenizer, r["messages"], stop_ids, model_name, max_length) for r in records]
    )


def train_sft(
    cfg: SFTConfig,
    base_dir: Path,
    train_records: Sequence[dict[str, Any]],
    eval_records: Sequence[dict[str, Any]],
    out_dir: Path,
    tracker: Tracker,
    work_dir: Path,
    compute: ComputeConfig | None = None,
    model_name: str = "",
) -> tuple[list[dict[str, float]], TrainablePolicy]:
    """Train and save the SFT policy (an adapter over ``base_dir`` by ``sft.peft``, or full weights).

    Returns the history and the trained policy (its model, with the adapter attached).
    ``model_name`` (``base.model``) only names the model in a chat-template error.
    """
    tokenizer = load_tokenizer(base_dir)
    policy = load_trainable(
        base_dir, cfg.peft, "sft.peft", compute=compute, new_tokens=new_token_ids(base_dir), seed=cfg.seed,
        scratch=work_dir.parent,
    )  # fmt: skip
    model = policy.model
    stop_ids = stop_token_ids(tokenizer, model)
    train_dataset, eval_dataset = (
        completion_dataset(tokenizer, records, stop_ids, model_name, cfg.max_length) if records else None
        for records in (train_records, eval_records)
    )
    common = trainer_args(
        work_dir,
        seed=cfg.seed,
        learning_rate=cfg.learning_rate,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        n_examples=len(train_records),
        has_eval=bool(eval_records),
        compute=compute,
        resumable=True,
    )
    if cfg.peft.method == "prefix":  # PEFT cannot recompute activations through prefix tuning
        common["gradient_checkpointing"] = False
    common |= policy.optimizer_args()
    args = TRLSFTConfig(
        **common,
        # already truncated above; TRL refuses max_length with padding-free batches and no packing
        max_length=None if cfg.padding_free else cfg.max_length,
        padding_free=cfg.padding_free,
        completion_only_loss=True,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_steps,
    )
    callback = TrackerCallback(tracker, prefix="sft/")
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=policy.peft_config,
        callbacks=[callback],
    )
    policy.settle(trainer)
    resume_or_train(trainer)
    save_policy(trainer.model, tokenizer, out_dir, base_dir, cfg.peft)
    policy.model = trainer.model
    return callback.history, policy
