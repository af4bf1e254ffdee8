"""Build the default base model offline: a byte-level BPE tokenizer and a small Llama.

Nothing is downloaded. The tokenizer is trained on the shipped corpus plus the task prompts,
carries a chat template whose assistant turns are wrapped in ``{% generation %}`` so TRL can
compute an assistant-only loss, and the model is a ``LlamaForCausalLM`` briefly pretrained on
the shipped corpus, which teaches task *content* (sums, spellings, capitals) but never the chat
format: that is what SFT adds.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    DataCollatorForLanguageModeling,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
)

from components.params import BaseConfig
from components.tracking import Tracker
from components.training.callbacks import TrackerCallback, trainer_args

PAD, EOS = "<|pad|>", "<|end|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, EOS, *ROLE_TOKENS)

# Assistant turns sit inside {% generation %} so apply_chat_template(return_assistant_tokens_mask=True)
# marks exactly the tokens SFT should learn (answer + end marker).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "<|assistant|>{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}"
    "{%- else -%}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)


def build_tokenizer(texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (any byte sequence is encodable) with our chat template."""
    tok = Tokenizer(models.BPE())
    # Digits are split one per token so sums are learnable digit by digit, not as a lookup of 2-digit tokens.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)
    fast.add_special_tokens({"additional_special_tokens": list(ROLE_TOKENS)})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(cfg: BaseConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A randomly initialised Llama sized by ``cfg`` (seeded, so the same config gives the same weights)."""
    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


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
