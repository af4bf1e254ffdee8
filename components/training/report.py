"""What ``metrics/align.json`` reports for every method, measured the same way: before vs after, held out.

The trained policy is an adapter over the SFT model, so one network gives both ends: with the
adapter disabled it *is* the SFT policy (the start), enabled it is the aligned one (the end).
On a fixed set of prompts that no alignment method trains on, each end samples
``n_samples`` completions per prompt; the align reward scores them (``reward_mean_start``,
``reward_mean_end``) and the verifier grades them (``accuracy_start``, ``accuracy_end``).
``kl_to_ref`` is the Monte-Carlo estimate of KL(policy || SFT) per completion: the mean, over the
policy's own samples, of the summed log-ratio of its tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from components.data.verifier import verify
from components.evaluation.generate import chat_prompt_ids, left_pad
from components.training.ppo import position_ids, response_logprobs, sample_responses
from components.training.rewards import RewardFunction


@torch.no_grad()
def _sample(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[Sequence[int]],
    n_samples: int,
    max_new_tokens: int,
    temperature: float,
    use_adapter: bool,
    batch_size: int,
    reference: torch.nn.Module | None = None,
) -> tuple[list[str], list[float]]:
    """Sampled completions, ``n_samples`` per prompt in prompt order, and each one's log-ratio to SFT.

    SFT is ``model`` with its adapter disabled, or ``reference`` (a full fine-tune's frozen start)."""
    texts: list[str] = []
    log_ratios: list[float] = []
    for start in range(0, len(prompt_ids), batch_size):
        ids, attn = left_pad(prompt_ids[start : start + batch_size], tokenizer.pad_token_id)
        ids, attn = ids.to(model.device), attn.to(model.device)
        sampler = model if use_adapter or reference is None else reference
        with nullcontext() if use_adapter or reference is not None else model.disable_adapter():
            response, mask, _ = sample_responses(
                sampler, tokenizer, ids, attn, max_new_tokens=max_new_tokens, temperature=temperature,
                num_return_sequences=n_samples,
            )  # fmt: skip
        n_prompt = ids.shape[1]
        texts.extend(t.strip() for t in tokenizer.batch_decode(response, skip_special_tokens=True))
        if use_adapter:
            full = torch.cat([ids.repeat_interleave(n_samples, dim=0), response], dim=1)
            full_mask = torch.cat([attn.repeat_interleave(n_samples, dim=0), mask.long()], dim=1)
            pos = position_ids(full_mask)
            policy = model(input_ids=full, attention_mask=full_mask, position_ids=pos).logits.float()
            if reference is not None:
                ref = reference(input_ids=full, attention_mask=full_mask, position_ids=pos).logits.float()
            else:
                with model.disable_adapter():
                    ref = model(input_ids=full, attention_mask=full_mask, position_ids=pos).logits.float()
            logp, _ = response_logprobs(policy, full, n_prompt, 1.0)
            ref_logp, _ = response_logprobs(ref, full, n_prompt, 1.0)
            log_ratios.extend(((logp - ref_logp) * mask).sum(dim=1).tolist())
    return texts, log_ratios


def held_out_report(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[dict[str, str]],
    reward: RewardFunction,
    *,
    n_samples: int = 4,
    max_new_tokens: int = 12,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
    reference: torch.nn.Module | None = None,
) -> dict[str, float]:
    """Reward and accuracy of SFT (start) and the aligned policy (end) on ``records``, and KL to SFT.

    ``reference``: the SFT policy as its own model, for a full fine-tune (no adapter to disable)."""
    if not records:
        raise ValueError("the held-out report needs at least one prompt")
    model.eval()
    if reference is not None:
        reference.eval()
    prompt_ids = chat_prompt_ids(tokenizer, [r["prompt"] for r in records])
    repeated = [r for r in records for _ in range(n_samples)]
    out: dict[str, float] = {"n_report_prompts": float(len(records))}
    for phase, use_adapter in (("start", False), ("end", True)):
        torch.manual_seed(seed)  # the same sampling noise for both ends
        texts, log_ratios = _sample(
            model, tokenizer, prompt_ids, n_samples, max_new_tokens, temperature, use_adapter, batch_size,
            reference,
        )  # fmt: skip
        scores = reward(repeated, texts)
        out[f"reward_mean_{phase}"] = sum(scores) / len(scores)
        hits = [verify(t, r["answer"]) for t, r in zip(texts, repeated, strict=True)]
        out[f"accuracy_{phase}"] = sum(hits) / len(hits)
        if use_adapter:
            out["kl_to_ref"] = sum(log_ratios) / len(log_ratios)
    return out
