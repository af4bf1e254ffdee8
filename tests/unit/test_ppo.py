"""PPO's maths on hand-computed cases, and a toy run that must learn a rewarded token."""

from __future__ import annotations

import math

import pytest
import torch

from components.params import PPOConfig
from components.training.ppo import (
    AdaptiveKLController,
    compute_gae,
    explained_variance,
    per_token_rewards,
    policy_loss,
    response_mask,
    train_ppo,
    value_loss,
    whiten,
)


def test_gae_three_steps_with_a_masked_tail() -> None:
    # gamma 0.9, lambda 0.8; the 4th position is padding with a value that must not leak in.
    rewards = torch.tensor([[0.5, 0.0, 1.0, 7.0]])
    values = torch.tensor([[0.2, 0.4, 0.6, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # delta2 = 1 + 0 - 0.6 = 0.4                        A2 = 0.4
    # delta1 = 0 + 0.9*0.6 - 0.4 = 0.14                 A1 = 0.14 + 0.72*0.4 = 0.428
    # delta0 = 0.5 + 0.9*0.4 - 0.2 = 0.66               A0 = 0.66 + 0.72*0.428 = 0.96816
    assert adv.tolist()[0] == pytest.approx([0.96816, 0.428, 0.4, 0.0])
    assert ret.tolist()[0] == pytest.approx([1.16816, 0.828, 1.0, 0.0])


def test_gae_rows_are_independent_and_gamma_one_lambda_one_is_monte_carlo() -> None:
    rewards = torch.tensor([[0.0, 0.0, 1.0], [2.0, 0.0, 0.0]])
    values = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    adv, ret = compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # lambda = 1: returns are the undiscounted reward-to-go, advantages = reward-to-go - value
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0, 1.0], [2.0, 0.0, 0.0]]))
    torch.testing.assert_close(adv, torch.tensor([[0.9, 0.8, 0.7], [1.5, 0.0, 0.0]]))


def test_clipped_policy_loss_inside_and_outside_the_clip_range() -> None:
    mask = torch.ones(1, 1)
    old = torch.zeros(1, 1)
    one = torch.ones(1, 1)

    def loss(ratio: float, advantage: float) -> tuple[float, float]:
        out, clipfrac, _ = policy_loss(torch.full((1, 1), math.log(ratio)), old, advantage * one, mask, 0.2)
        return float(out), float(clipfrac)

    assert loss(1.1, 1.0) == pytest.approx((-1.1, 0.0))  # inside: the plain surrogate -A*r
    assert loss(1.5, 1.0) == pytest.approx((-1.2, 1.0))  # above 1+eps with A > 0: capped at 1.2
    assert loss(0.5, -1.0) == pytest.approx((0.8, 1.0))  # below 1-eps with A < 0: capped at 0.8
    assert loss(1.5, -1.0) == pytest.approx((1.5, 0.0))  # the pessimistic side is never clipped
    assert loss(0.5, 1.0) == pytest.approx((-0.5, 0.0))


def test_policy_loss_ignores_masked_tokens_and_reports_approx_kl() -> None:
    logp = torch.tensor([[math.log(1.1), 5.0]])
    out, clipfrac, approx_kl = policy_loss(
        logp, torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([[1.0, 0.0]]), 0.2
    )
    assert float(out) == pytest.approx(-1.1)
    assert float(clipfrac) == 0.0
    assert float(approx_kl) == pytest.approx(0.5 * math.log(1.1) ** 2)


def test_clipped_value_loss() -> None:
    old, ret, mask = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2)
    # pos 0: v=0.5 moved +0.5 from old -> clipped to 0.2; (0.5-1)^2=0.25 < (0.2-1)^2=0.64 -> 0.64
    # pos 1: v=0.1 inside the range -> (0.1+1)^2 = 1.21 both ways
    loss, clipfrac = value_loss(torch.tensor([[0.5, 0.1]]), old, ret, mask, 0.2)
    assert float(loss) == pytest.approx(0.5 * (0.64 + 1.21) / 2)
    assert float(clipfrac) == pytest.approx(0.5)


def test_kl_penalty_lowers_the_reward_of_drifting_tokens_and_the_score_lands_last() -> None:
    logp = torch.tensor([[-1.0, -0.5, -2.0, 0.0]])
    ref = torch.tensor([[-1.5, -0.5, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    rewards, kl = per_token_rewards(torch.tensor([3.0]), logp, ref, mask, kl_coef=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, -1.0, 0.0]]))
    # more likely than the reference -> penalised; as likely -> 0; the score sits on the last valid token
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0, 0.1 + 3.0, 0.0]]))


def test_kl_controller_moves_toward_the_target() -> None:
    up = AdaptiveKLController(0.1, target=1.0, horizon=100)
    assert up.update(3.0, n_steps=10) == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))  # error capped at +0.2
    down = AdaptiveKLController(0.1, target=1.0, horizon=100)
    assert down.update(0.9, n_steps=10) == pytest.approx(0.1 * (1 - 0.1 * 10 / 100))
    assert down.value < 0.1 < up.value
    fixed = AdaptiveKLController(0.1, target=None, horizon=100)
    assert fixed.update(50.0, n_steps=10) == 0.1


def test_response_mask_stops_after_the_first_eos() -> None:
    mask, finished = response_mask(torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8]]), eos_id=2)
    assert mask.tolist() == [[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]
    assert finished.tolist() == [True, False]


def test_whiten_and_explained_variance() -> None:
    x, mask = torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = whiten(x, mask)
    assert float(w[0, :3].mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(w[0, :3].pow(2).mean()) == pytest.approx(1.0, rel=1e-4)
    assert float(w[0, 3]) == 0.0
    assert explained_variance(x, x, mask) == pytest.approx(1.0)
    assert explained_variance(torch.zeros_like(x) + 2.0, x, mask) == pytest.approx(0.0, abs=1e-6)


def test_toy_ppo_learns_to_emit_the_rewarded_token() -> None:
    """A random 2-layer Llama over 16 tokens; reward 1 when the first response token is 7."""
    from peft import LoraConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    class ToyTokenizer:
        pad_token_id, eos_token_id = 0, 1

        def batch_decode(self, rows: torch.Tensor, skip_special_tokens: bool = True) -> list[str]:
            return [" ".join(str(int(t)) for t in row if int(t) > 1) for row in rows]

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=32, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    prompts = [[2, 3 + i % 4, 4] for i in range(32)]
    records = [{"prompt": str(p), "answer": "7"} for p in prompts]

    def score(recs: object, texts: list[str]) -> list[float]:
        return [1.0 if t.split()[:1] == ["7"] else 0.0 for t in texts]

    settings = PPOConfig(
        steps=40, batch_size=16, minibatch_size=8, ppo_epochs=2, learning_rate=5e-3, max_new_tokens=3,
        init_kl_coef=0.01, target_kl=0.0, missing_eos_penalty=0.0,
    )  # fmt: skip
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    _, history = train_ppo(model, ToyTokenizer(), records, prompts, score, settings, lora)  # type: ignore[arg-type]
    first = sum(h["reward"] for h in history[:5]) / 5
    last = sum(h["reward"] for h in history[-5:]) / 5
    assert first < 0.3  # about 1/16 by chance
    assert last > 0.8, [round(h["reward"], 2) for h in history]
    for key in (
        "kl",
        "entropy",
        "clipfrac",
        "approxkl",
        "value_loss",
        "explained_variance",
        "response_length",
    ):
        assert all(math.isfinite(h[key]) for h in history), key
