"""PPO for language models (Ziegler et al. 2019; Stiennon et al. 2020), ours: TRL 1.16 has no PPO.

The whole algorithm, top to bottom:

1. **Model.** The policy is the merged SFT model with a fresh LoRA adapter and a scalar value
   head on its last hidden state. The reference is the same network with the adapter disabled,
   so it is exactly the SFT policy and costs no second copy in memory.
2. **Rollout.** For a batch of prompts, sample one response each (temperature, at most
   ``max_new_tokens``, stopping at EOS). The response mask covers the tokens up to and including
   the first EOS; a response cut off by the length bound is scored as it stands, minus
   ``missing_eos_penalty``, so the reward model only ever sees finished answers as finished.
3. **Scores.** ``score_fn`` (the verifier, the trained reward model, or both) gives one scalar
   per response. The per-token reward is ``-kl_coef * (log pi - log pi_ref)`` at every response
   token, plus the score at the last one.
4. **Advantages.** GAE(gamma, lambda) over the response tokens, the value after the last token
   being 0; returns = advantages + values; advantages are whitened over the batch.
5. **Update.** ``ppo_epochs`` passes of shuffled minibatches: the clipped surrogate objective on
   the policy, the clipped value loss on the head (weight ``vf_coef``), one AdamW over both.
6. **Control.** The adaptive KL controller moves ``kl_coef`` so the measured KL tracks
   ``target_kl``.
7. **Resume.** Every ``checkpoint_steps`` steps the whole loop state (trainable weights, value
   head, optimizer, KL coefficient, data order and RNG states) is saved to ``work_dir``; a
   re-run with the same ``work_dir`` continues after the newest complete checkpoint and ends at
   the weights an uninterrupted run reaches.

The maths lives in small pure functions (:func:`compute_gae`, :func:`policy_loss`,
:func:`value_loss`, :func:`per_token_rewards`, :class:`AdaptiveKLController`), each tested on
hand-computed cases in ``tests/unit/test_ppo.py``.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from components.evaluation.generate import left_pad
from components.params import PPOConfig
from components.training.checkpoints import last_checkpoint

# (prompt records, response texts) -> one score per response
ScoreFn = Callable[[Sequence[dict[str, str]], Sequence[str]], Sequence[float]]


# --------------------------------------------------------------------------- pure maths


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise ``x`` to unit variance (and zero mean) over the positions where ``mask == 1``."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over (batch, T) tensors.

    Positions with ``mask == 0`` are ignored: they get advantage 0 and do not carry the
    recursion (a masked position between valid ones is skipped, not treated as an episode
    end). The value after the last valid token is 0 (the episode ends there).
    ``returns = advantages + values`` on valid positions, 0 elsewhere.
    """
    rewards, values, mask = rewards.float(), values.float(), mask.float()
    batch, length = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(batch, dtype=rewards.dtype, device=rewards.device)
    next_advantage = torch.zeros_like(next_value)
    for t in reversed(range(length)):
        valid = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = advantage * valid
        # carry the recursion only through valid positions
        next_value = torch.where(valid.bool(), values[:, t], next_value)
        next_advantage = torch.where(valid.bool(), advantage, next_advantage)
    returns = (advantages + values) * mask
    return advantages, returns


def per_token_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards, kl): ``-kl_coef * kl`` at every valid token, plus each score at its last valid token.

    ``kl`` is the per-token estimate ``log pi - log pi_ref`` (zero where masked); a policy that
    drifts from the reference is penalised, one that stays on it is not.
    """
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = mask.long().cumsum(dim=1).argmax(dim=1)  # index of the last valid position
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    has_token = mask.sum(dim=1) > 0
    rewards[rows[has_token], last[has_token]] += scores[has_token].to(rewards.dtype)
    return rewards, kl


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate: (loss, clip fraction, approx KL old->new), means over valid tokens.

    ``loss = mean(max(-A * r, -A * clip(r, 1 - eps, 1 + eps)))`` with ``r = exp(logp - logp_old)``:
    the ratio earns no more credit once it leaves the clip range in the advantage's direction.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = 0.5 * masked_mean((logprobs - old_logprobs) ** 2, mask)
    return loss, clip_fraction, approx_kl


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss ``0.5 * mean(max((v - R)^2, (v_clip - R)^2))`` and its clip fraction.

    ``v_clip = v_old + clip(v - v_old, -eps_v, eps_v)``: the head cannot jump far from the values
    the advantages were computed with in one update.
    """
    clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)
    return loss, masked_mean((loss_clipped > loss_unclipped).float(), mask)


class AdaptiveKLController:
    """Ziegler et al.'s proportional controller: ``coef *= 1 + clip(kl / target - 1, ±0.2) * n / horizon``.

    KL above target raises the penalty, below target lowers it; ``target=None`` keeps it fixed.
    """

    def __init__(self, init_coef: float, target: float | None, horizon: int) -> None:
        self.value = init_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        if self.target is not None and self.target > 0:
            error = max(-0.2, min(0.2, current_kl / self.target - 1.0))
            self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over valid positions: 1 is a perfect critic, <= 0 a useless one."""
    var_returns = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    residual = returns - values
    var_residual = masked_mean((residual - masked_mean(residual, mask)) ** 2, mask)
    return float(1.0 - var_residual / var_returns.clamp(min=1e-8))


# --------------------------------------------------------------------------- the model


class PolicyWithValueHead(nn.Module):
    """A (LoRA) causal LM plus ``value_head``: hidden state (last layer) -> scalar value per position."""

    def __init__(self, policy: PeftModel) -> None:
        super().__init__()
        self.policy = policy
        hidden = policy.get_base_model().config.hidden_size
        self.value_head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.policy(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids(attention_mask),
            output_hidden_states=True,
        )
        values = self.value_head(out.hidden_states[-1].float()).squeeze(-1)
        return out.logits.float(), values


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token, as ``generate`` numbers a left-padded batch."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def response_logprobs(
    logits: torch.Tensor, input_ids: torch.Tensor, n_prompt: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the response tokens (positions ``n_prompt:``) under ``logits / temperature``; entropies.

    Dividing by the sampling temperature makes these the log-probs of the distribution the
    rollout was sampled from, so the first PPO ratio is exactly 1.
    """
    scaled = logits[:, n_prompt - 1 : -1] / temperature
    logp_all = F.log_softmax(scaled, dim=-1)
    targets = input_ids[:, n_prompt:]
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def response_mask(response: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask over response tokens up to and including the first EOS, whether each row has an EOS)."""
    is_eos = response == eos_id
    # positions strictly after the first EOS are padding
    after_first = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
    return (~after_first).float(), is_eos.any(dim=1)


# --------------------------------------------------------------------------- training


def sample_responses(
    policy: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    ids: torch.Tensor,
    attn: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float,
    num_return_sequences: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sampled responses to left-padded prompts: (tokens, padded after the first EOS; mask; finished)."""
    generated = policy.generate(
        input_ids=ids,
        attention_mask=attn,
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=temperature,
        top_p=None,
        top_k=None,
        num_return_sequences=num_return_sequences,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    response = generated[:, ids.shape[1] :]
    mask, finished = response_mask(response, tokenizer.eos_token_id)
    response = torch.where(mask.bool(), response, torch.full_like(response, tokenizer.pad_token_id))
    return response, mask, finished


@dataclass
class Rollout:
    """One batch of sampled responses and everything the update needs, all (batch, T) but ``scores``."""

    input_ids: torch.Tensor  # prompt (left-padded) + response (padded after EOS)
    attention_mask: torch.Tensor
    n_prompt: int
    mask: torch.Tensor  # valid response tokens
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor  # (batch,)
    lengths: torch.Tensor  # (batch,)


@torch.no_grad()
def rollout(
    model: PolicyWithValueHead,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[dict[str, str]],
    prompt_ids: Sequence[Sequence[int]],
    score_fn: ScoreFn,
    s: PPOConfig,
) -> Rollout:
    """Sample one response per prompt and score it; log-probs under policy and reference."""
    model.eval()
    device = model.value_head.weight.device
    ids, attn = (t.to(device) for t in left_pad(prompt_ids, tokenizer.pad_token_id))
    n_prompt = ids.shape[1]
    response, mask, finished = sample_responses(
        model.policy, tokenizer, ids, attn, max_new_tokens=s.max_new_tokens, temperature=s.temperature
    )
    input_ids = torch.cat([ids, response], dim=1)
    attention = torch.cat([attn, mask.long()], dim=1)
    logits, values = model(input_ids, attention)
    logprobs, _ = response_logprobs(logits, input_ids, n_prompt, s.temperature)
    with model.policy.disable_adapter():
        ref_logits = model.policy(
            input_ids=input_ids, attention_mask=attention, position_ids=position_ids(attention)
        ).logits.float()
    ref_logprobs, _ = response_logprobs(ref_logits, input_ids, n_prompt, s.temperature)
    texts = tokenizer.batch_decode(response, skip_special_tokens=True)
    scores = torch.tensor([float(x) for x in score_fn(records, [t.strip() for t in texts])], device=device)
    if torch.isnan(scores).any():
        raise ValueError("the reward returned NaN for a response; check the reward model (align.reward)")
    scores = scores - s.missing_eos_penalty * (~finished).float()
    return Rollout(
        input_ids=input_ids,
        attention_mask=attention,
        n_prompt=n_prompt,
        mask=mask,
        logprobs=logprobs * mask,
        ref_logprobs=ref_logprobs * mask,
        values=values[:, n_prompt - 1 : -1] * mask,
        scores=scores,
        lengths=mask.sum(dim=1),
    )


def ppo_update(
    model: PolicyWithValueHead,
    optimizer: torch.optim.Optimizer,
    batch: Rollout,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    s: PPOConfig,
    generator: torch.Generator,
) -> dict[str, float]:
    """``ppo_epochs`` passes of shuffled minibatches over one rollout; mean statistics."""
    model.train()
    stats: dict[str, list[float]] = {
        k: [] for k in ("loss", "policy_loss", "value_loss", "clipfrac", "approxkl", "entropy")
    }
    n = batch.input_ids.shape[0]
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(s.ppo_epochs):
        for idx in torch.randperm(n, generator=generator).split(s.minibatch_size):
            logits, values = model(batch.input_ids[idx], batch.attention_mask[idx])
            logp, entropy = response_logprobs(logits, batch.input_ids[idx], batch.n_prompt, s.temperature)
            values = values[:, batch.n_prompt - 1 : -1]
            mask = batch.mask[idx]
            pg_loss, clipfrac, approxkl = policy_loss(
                logp, batch.logprobs[idx], advantages[idx], mask, s.clip_range
            )
            vf_loss, _ = value_loss(values, batch.values[idx], returns[idx], mask, s.clip_range_value)
            loss = pg_loss + s.vf_coef * vf_loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
            optimizer.step()
            for key, value in (
                ("loss", loss),
                ("policy_loss", pg_loss),
                ("value_loss", vf_loss),
                ("clipfrac", clipfrac),
                ("approxkl", approxkl),
                ("entropy", masked_mean(entropy, mask)),
            ):
                stats[key].append(float(value.detach()))
    return {k: sum(v) / len(v) for k, v in stats.items()}


# --------------------------------------------------------------------------- resume

CHECKPOINT_STATE = "ppo_state.pt"


def save_checkpoint(work_dir: Path, step: int, model: nn.Module, state: dict[str, Any]) -> None:
    """``work_dir/checkpoint-<step>``: the loop state, then ``trainer_state.json`` last.

    The marker file is what :func:`~components.training.checkpoints.last_checkpoint` takes as
    "complete", so a kill mid-write leaves the previous checkpoint the one resumed from; only
    after the new one is complete is the previous one deleted.
    """
    path = work_dir / f"checkpoint-{step}"
    path.mkdir(parents=True, exist_ok=True)
    trainable = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    torch.save({"trainable": trainable, **state}, path / CHECKPOINT_STATE)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    for old in work_dir.glob("checkpoint-*"):
        if old != path:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, model: nn.Module) -> dict[str, Any]:
    """Copy the saved trainable tensors into ``model``; the rest of the saved loop state."""
    state = torch.load(path / CHECKPOINT_STATE, map_location="cpu", weights_only=True)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in state.pop("trainable").items():
            params[name].copy_(tensor)
    return state


def train_ppo(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[dict[str, str]],
    prompt_ids: Sequence[Sequence[int]],
    score_fn: ScoreFn,
    settings: PPOConfig,
    peft_config: object,
    seed: int = 0,
    log: Callable[[dict[str, float], int], None] | None = None,
    work_dir: Path | None = None,
    checkpoint_steps: int = 0,
) -> tuple[PeftModel, list[dict[str, float]]]:
    """Run PPO on ``policy`` (wrapped in ``peft_config``); the trained adapter model and the history.

    ``records[i]`` is the prompt record ``score_fn`` grades (it holds the reference answer),
    ``prompt_ids[i]`` its chat-formatted token ids. Each step draws ``batch_size`` of them.
    With ``work_dir`` and ``checkpoint_steps > 0`` the run checkpoints and resumes (step 7 above).
    """
    s = settings
    if not records:
        raise ValueError("PPO needs at least one prompt")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    peft_model = get_peft_model(policy, peft_config)  # type: ignore[arg-type]
    model = PolicyWithValueHead(peft_model).to(next(policy.parameters()).device)
    # the value head starts at zero and must catch up with the returns: it gets its own, larger rate
    policy_params = [p for p in model.policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": policy_params, "lr": s.learning_rate},
            {"params": list(model.value_head.parameters()), "lr": s.value_learning_rate},
        ]
    )
    kl_ctl = AdaptiveKLController(s.init_kl_coef, s.target_kl or None, s.kl_horizon)
    history: list[dict[str, float]] = []
    order = torch.randperm(len(records), generator=generator).tolist()
    cursor, done = 0, 0
    resume = last_checkpoint(work_dir) if work_dir is not None else None
    if resume:
        print(f"resuming from {resume}", flush=True)
        state = load_checkpoint(Path(resume), model)
        optimizer.load_state_dict(state["optimizer"])
        kl_ctl.value = state["kl_coef"]
        order, cursor, done, history = state["order"], state["cursor"], state["step"], state["history"]
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") and torch.cuda.is_available():  # sampling on a GPU draws from here
            torch.cuda.set_rng_state_all(state["cuda_rng"])
    for step in tqdm(range(done + 1, s.steps + 1), desc="ppo", unit="step", initial=done, total=s.steps):
        start = time.perf_counter()
        if cursor + s.batch_size > len(order):
            order, cursor = torch.randperm(len(records), generator=generator).tolist(), 0
        idx = order[cursor : cursor + s.batch_size] or order[: s.batch_size]
        cursor += s.batch_size
        batch = rollout(
            model, tokenizer, [records[i] for i in idx], [prompt_ids[i] for i in idx], score_fn, s
        )
        rewards, kl = per_token_rewards(
            batch.scores, batch.logprobs, batch.ref_logprobs, batch.mask, kl_ctl.value
        )
        advantages, returns = compute_gae(rewards, batch.values, batch.mask, s.gamma, s.lam)
        advantages = whiten(advantages, batch.mask)
        update = ppo_update(model, optimizer, batch, advantages, returns, s, generator)
        seq_kl = float(kl.sum(dim=1).mean())
        row = {
            "step": float(step),
            "reward": float(batch.scores.mean()),
            "kl": seq_kl,
            "kl_coef": kl_ctl.value,
            "response_length": float(batch.lengths.float().mean()),
            "explained_variance": explained_variance(batch.values, returns, batch.mask),
            "step_seconds": time.perf_counter() - start,
            **update,
        }
        kl_ctl.update(seq_kl, s.batch_size)
        if not all(math.isfinite(v) for v in row.values()):
            raise FloatingPointError(f"PPO step {step} produced a non-finite statistic: {row}")
        history.append(row)
        if log is not None:
            log({k: v for k, v in row.items() if k != "step"}, step)
        if work_dir is not None and checkpoint_steps and step % checkpoint_steps == 0 and step < s.steps:
            save_checkpoint(
                work_dir,
                step,
                model,
                {
                    "step": step,
                    "optimizer": optimizer.state_dict(),
                    "kl_coef": kl_ctl.value,
                    "order": order,
                    "cursor": cursor,
                    "history": history,
                    "generator": generator.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                },
            )
    return peft_model, history
