"""Batched generation from a chat model: greedy for accuracy, sampled for rewards and preferences."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

Prompt = str | Sequence[dict[str, str]]  # one user turn, or a whole conversation so far


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt]) -> list[list[int]]:
    """Token ids of each prompt (a user turn, or the turns given) followed by the assistant marker."""
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}] if isinstance(p, str) else list(p),
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        for p in prompts
    ]


def left_pad(batch: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of token-id rows padded on the left, as decoder-only generation wants."""
    width = max(len(x) for x in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, row in enumerate(batch):
        ids[i, width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids, mask


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int = 12,
    temperature: float = 0.0,
    num_return_sequences: int = 1,
    batch_size: int = 64,
    seed: int = 0,
) -> list[list[str]]:
    """Completions per prompt (``num_return_sequences`` each). ``temperature == 0`` means greedy."""
    model.eval()
    torch.manual_seed(seed)
    all_ids = chat_prompt_ids(tokenizer, prompts)
    out: list[list[str]] = []
    for start in range(0, len(all_ids), batch_size):
        ids, mask = left_pad(all_ids[start : start + batch_size], tokenizer.pad_token_id)
        sampling = temperature > 0
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=sampling,
            temperature=temperature if sampling else None,
            top_p=None,
            top_k=None,
            num_return_sequences=num_return_sequences,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(gen[:, ids.shape[1] :], skip_special_tokens=True)
        for i in range(0, len(texts), num_return_sequences):
            out.append([t.strip() for t in texts[i : i + num_return_sequences]])
    return out
