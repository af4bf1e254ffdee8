"""Bit-Delta: sign packing, the alpha = mean|Δ| init, tied weights, scale distillation (only the
scales move, and the KL to the teacher drops), save/load against the right base, size (tiny Llama, CPU)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from components.compression.bitdelta import (
    BITDELTA_FILE,
    BitDeltaEmbedding,
    BitDeltaLinear,
    TiedBitDeltaHead,
    base_weights_hash,
    bitdelta_targets,
    build_bitdelta_model,
    delta_bytes,
    delta_compression_vs_fp16,
    distill_scales,
    load_bitdelta,
    materialize,
    mean_kl,
    pack_signs,
    save_bitdelta,
    scale_parameters,
    unpack_signs,
)

VOCAB = 64


def _tiny_llama(tie: bool, hidden: int = 32, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config).eval()


@torch.no_grad()
def _fine_tune(base: nn.Module, seed: int = 1, scale: float = 0.01) -> nn.Module:
    """A stand-in fine-tune: seeded noise on every 2-D weight (a tied one once) and on one norm."""
    fine = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    for param in fine.parameters():  # deduplicated, so a tied weight moves once and stays tied
        if param.dim() == 2:
            param.add_(scale * torch.randn(param.shape, generator=g))
    fine.model.norm.weight.add_(0.1 * torch.randn(fine.model.norm.weight.shape, generator=g))
    return fine


def _sequences(n: int = 8, seed: int = 2) -> list[list[int]]:
    """Calibration sequences of different lengths, so batches need padding."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (8 + i % 5,), generator=g).tolist() for i in range(n)]


@torch.no_grad()
def _logits(model: nn.Module, seqs: list[list[int]]) -> torch.Tensor:
    return model(input_ids=torch.tensor([s[:8] for s in seqs])).logits


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


@torch.no_grad()
def _scale_alphas(model: nn.Module, factor: float) -> None:
    """Start the scales away from their optimum, so distillation has something to repair."""
    for alpha in scale_parameters(model):
        alpha.mul_(factor)


@pytest.fixture(scope="module")
def tied() -> dict:
    base = _tiny_llama(tie=True)
    fine = _fine_tune(base)
    return {"base": base, "fine": fine, "seqs": _sequences()}


@pytest.fixture(scope="module")
def untied() -> dict:
    base = _tiny_llama(tie=False)
    fine = _fine_tune(base)
    return {"base": base, "fine": fine, "seqs": _sequences()}


# ----------------------------------------------------------------- sign bits


@pytest.mark.parametrize("shape", [(3, 5), (7,), (2, 8), (1,)])
def test_signs_round_trip_exactly(shape):
    delta = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    delta.view(-1)[0] = 0.0  # zero counts as negative
    packed = pack_signs(delta)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == math.ceil(delta.numel() / 8)
    signs = unpack_signs(packed, shape)
    assert signs.shape == shape and signs.dtype == torch.float32
    assert torch.equal(signs, torch.where(delta > 0, 1.0, -1.0))
    assert unpack_signs(packed, shape, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_sign_bits_are_little_endian_within_a_byte():
    delta = torch.tensor([1.0, -1, -1, 2, -1, -1, -1, 0.5, -3.0, 0.1])
    assert pack_signs(delta).tolist() == [0b10001001, 0b10]
    with pytest.raises(ValueError, match="signs"):
        unpack_signs(pack_signs(delta), (4, 5))


# ----------------------------------------------------------------- modules


def test_alpha_starts_at_mean_abs_delta_and_forward_is_base_plus_alpha_signs():
    base = nn.Linear(2, 2)
    with torch.no_grad():
        base.weight.copy_(torch.eye(2))
        base.bias.copy_(torch.tensor([0.1, 0.2]))
    fine_weight = torch.eye(2) + torch.tensor([[0.5, -1.0], [2.0, -0.5]])
    fine_bias = torch.tensor([0.3, -0.4])
    layer = BitDeltaLinear.from_fine(base, fine_weight, fine_bias)
    assert layer.alpha.item() == 1.0  # mean(|0.5|, |-1|, |2|, |-0.5|)
    assert torch.equal(unpack_signs(layer.signs, (2, 2)), torch.tensor([[1.0, -1], [1, -1]]))
    # effective weight [[2, -1], [1, 0]]; x = [1, 2] -> [0, 1] + the fine bias
    out = layer(torch.tensor([[1.0, 2.0]]))
    assert torch.allclose(out, torch.tensor([[0.3, 0.6]]), atol=1e-6, rtol=0)
    assert [n for n, p in layer.named_parameters()] == ["alpha"]  # base weight and signs are buffers
    assert torch.equal(layer.base_weight, torch.eye(2))

    embedding = BitDeltaEmbedding.from_fine(nn.Embedding(2, 2, _weight=torch.eye(2)), fine_weight)
    assert embedding.alpha.item() == 1.0
    assert torch.allclose(embedding(torch.tensor([1, 0])), torch.tensor([[1.0, 0], [2, -1]]))


# ----------------------------------------------------------------- targets and the model


def test_targets_cover_changed_matrices_dense_tensors_and_tied_weights(tied):
    targets = bitdelta_targets(tied["base"], tied["fine"])
    assert targets["model.embed_tokens.weight"] == "embedding"
    assert targets["lm_head.weight"] == "tied"
    assert targets["model.layers.1.mlp.down_proj.weight"] == "linear"
    assert targets["model.norm.weight"] == "dense"
    assert "model.layers.0.input_layernorm.weight" not in targets  # unchanged: nothing stored
    assert list(targets.values()).count("linear") == 2 * 7


def test_targets_reject_a_shape_mismatch(untied):
    other = LlamaForCausalLM(untied["base"].config)
    other.lm_head = nn.Linear(32, VOCAB + 1, bias=False)
    with pytest.raises(ValueError, match="lm_head.weight"):
        bitdelta_targets(untied["base"], other)


def test_model_at_init_is_closer_to_the_fine_tune_than_the_base_and_stays_tied(tied):
    base, fine, seqs = tied["base"], tied["fine"], tied["seqs"]
    before = (_snapshot(base), _snapshot(fine))
    model = build_bitdelta_model(base, fine)
    for snapshot, original in zip(before, (base, fine), strict=True):
        assert all(torch.equal(t, original.state_dict()[n]) for n, t in snapshot.items())
    assert base.lm_head.weight is base.model.embed_tokens.weight

    kl_bitdelta, kl_base = mean_kl(fine, model, seqs), mean_kl(fine, base, seqs)
    assert 0 < kl_bitdelta < 0.7 * kl_base

    embed = model.model.embed_tokens
    assert isinstance(embed, BitDeltaEmbedding) and isinstance(model.lm_head, TiedBitDeltaHead)
    assert model.lm_head.owner is embed
    fine_embed = fine.model.embed_tokens.weight
    assert embed.alpha.item() == pytest.approx(
        (fine_embed - base.model.embed_tokens.weight).abs().mean().item()
    )
    hidden = torch.randn(3, 32)
    assert torch.equal(model.lm_head(hidden), F.linear(hidden, embed.effective_weight()))
    with torch.no_grad():  # moving the shared scale moves the head too
        embed.alpha.add_(0.5)
    assert torch.equal(model.lm_head(hidden), F.linear(hidden, embed.effective_weight()))

    alphas = scale_parameters(model)
    assert len(alphas) == 1 + 2 * 7 and len({id(a) for a in alphas}) == len(alphas)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(a) for a in alphas}
    assert torch.equal(model.model.norm.weight, fine.model.norm.weight)  # dense entry from the fine-tune


def test_materialized_model_matches_the_bitdelta_model(tied, untied):
    for case in (tied, untied):
        model = build_bitdelta_model(case["base"], case["fine"])
        _scale_alphas(model, 1.7)
        plain = materialize(model)
        modules = list(plain.modules())
        assert not any(isinstance(m, (BitDeltaLinear, BitDeltaEmbedding, TiedBitDeltaHead)) for m in modules)
        assert type(plain.lm_head) is nn.Linear
        if case is tied:
            assert plain.lm_head.weight is plain.model.embed_tokens.weight
        assert torch.allclose(_logits(plain, case["seqs"]), _logits(model, case["seqs"]), atol=1e-5, rtol=0)


# ----------------------------------------------------------------- scale distillation


def test_distillation_moves_only_the_scales_and_halves_the_kl(tied):
    fine, seqs = tied["fine"], tied["seqs"]
    student = build_bitdelta_model(tied["base"], fine)
    _scale_alphas(student, 3.0)
    before = _snapshot(student)
    kl_before = mean_kl(fine, student, seqs)
    history = distill_scales(student, fine, seqs, objective="kl", steps=20, learning_rate=2e-3, batch_size=4)
    kl_after = mean_kl(fine, student, seqs)
    assert [h["step"] for h in history] == list(range(20))
    assert kl_after <= 0.5 * kl_before, (kl_before, kl_after)

    after = student.state_dict()
    assert after.keys() == before.keys()
    alpha_names = [n for n in before if n.endswith(".alpha")]
    assert len(alpha_names) == len(scale_parameters(student))
    for name, tensor in before.items():
        if name in alpha_names:
            assert not torch.equal(after[name], tensor), name
        else:
            assert torch.equal(after[name], tensor), name
    assert (
        isinstance(student.lm_head, TiedBitDeltaHead) and student.lm_head.owner is student.model.embed_tokens
    )


def test_kl_loss_is_the_mean_token_kl_over_unpadded_tokens(untied):
    fine, seqs = untied["fine"], untied["seqs"]
    student = build_bitdelta_model(untied["base"], fine)
    expected = mean_kl(fine, student, seqs)  # one unpadded sequence at a time
    history = distill_scales(student, fine, seqs, steps=1, learning_rate=1e-3, batch_size=len(seqs))
    assert history[0]["loss"] == pytest.approx(expected, rel=1e-4)


def test_mse_objective_reduces_its_loss(untied):
    fine, seqs = untied["fine"], untied["seqs"]
    student = build_bitdelta_model(untied["base"], fine)
    _scale_alphas(student, 3.0)
    kl_before = mean_kl(fine, student, seqs)
    # one batch of every sequence, so each step's loss is over the same tokens
    history = distill_scales(
        student, fine, seqs, objective="mse", steps=15, learning_rate=2e-3, batch_size=len(seqs)
    )
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert mean_kl(fine, student, seqs) < kl_before


def test_distillation_is_deterministic_and_checks_its_arguments(untied):
    fine, seqs = untied["fine"], untied["seqs"]
    runs = []
    for _ in range(2):
        student = build_bitdelta_model(untied["base"], fine)
        runs.append(distill_scales(student, fine, seqs, steps=3, learning_rate=1e-3, batch_size=3, seed=5))
    assert runs[0] == runs[1]
    with pytest.raises(ValueError, match="compress.bitdelta.objective"):
        distill_scales(student, fine, seqs, objective="cosine", steps=1)
    student.model.norm.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="model.norm.weight"):
        distill_scales(student, fine, seqs, steps=1)


# ----------------------------------------------------------------- save / load


@pytest.mark.parametrize("case", ["tied", "untied"])
def test_save_load_round_trip_reproduces_the_logits(case, request, tmp_path):
    data = request.getfixturevalue(case)
    base, seqs = data["base"], data["seqs"]
    model = build_bitdelta_model(base, data["fine"])
    _scale_alphas(model, 1.3)  # not the init values, so the saved alphas are what is loaded
    path = save_bitdelta(model, tmp_path, base_weights_hash(base))
    assert path == tmp_path / BITDELTA_FILE

    tensors = load_file(str(path))
    assert tensors["model.layers.0.self_attn.q_proj.signs"].dtype == torch.uint8
    assert tensors["model.layers.0.self_attn.q_proj.alpha"].dtype == torch.float32
    assert tensors["model.norm.weight"].dtype == torch.float32
    assert not any(k.endswith(("base_weight", "sign_matrix")) for k in tensors)
    assert "model.layers.0.input_layernorm.weight" not in tensors  # equal to the base
    with safe_open(str(path), "pt") as fh:
        metadata = fh.metadata()
    assert metadata["format"] == "posttrain-bitdelta"
    assert metadata["base_sha256"] == base_weights_hash(base)
    assert json.loads(metadata["shapes"])["model.layers.0.mlp.up_proj"] == [64, 32]
    if case == "tied":
        assert json.loads(metadata["tied"]) == {"lm_head": "model.embed_tokens"}
        assert not any(k.startswith("lm_head") for k in tensors)  # stored once, under the embedding

    loaded = load_bitdelta(tmp_path, base)
    assert torch.equal(_logits(loaded, seqs), _logits(model, seqs))
    assert {id(p) for p in loaded.parameters() if p.requires_grad} == {
        id(a) for a in scale_parameters(loaded)
    }
    if case == "tied":
        assert loaded.lm_head.owner is loaded.model.embed_tokens
    assert delta_bytes(path) == delta_bytes(model)


def test_load_refuses_another_base_or_another_format(untied, tmp_path):
    base = untied["base"]
    save_bitdelta(build_bitdelta_model(base, untied["fine"]), tmp_path, base_weights_hash(base))
    other_base = _tiny_llama(tie=False, seed=7)
    with pytest.raises(ValueError, match="base") as err:
        load_bitdelta(tmp_path, other_base)
    assert BITDELTA_FILE in str(err.value)

    tensors = load_file(str(tmp_path / BITDELTA_FILE))
    save_file(tensors, str(tmp_path / BITDELTA_FILE), metadata={"format": "posttrain-int8-weight"})
    with pytest.raises(ValueError, match="format"):
        load_bitdelta(tmp_path, base)


def test_base_hash_follows_the_weights(untied):
    base = untied["base"]
    same = copy.deepcopy(base)
    assert base_weights_hash(same) == base_weights_hash(base)
    with torch.no_grad():
        same.model.layers[1].mlp.up_proj.weight[0, 0] += 1e-3
    assert base_weights_hash(same) != base_weights_hash(base)


# ----------------------------------------------------------------- size


def test_one_bit_per_weight_is_about_16x_smaller_than_fp16():
    base = _tiny_llama(tie=False, hidden=64)
    one = copy.deepcopy(base)
    with torch.no_grad():
        one.model.layers[0].self_attn.q_proj.weight.add_(0.01)
    only_q = build_bitdelta_model(base, one)
    # one 64x64 matrix: 8192 bytes in fp16, 4096 bits = 512 bytes + a 4-byte fp32 alpha
    assert delta_bytes(only_q) == (8192, 516)
    assert delta_compression_vs_fp16(only_q) == 8192 / 516

    model = build_bitdelta_model(base, _fine_tune(base))
    fp16, packed = delta_bytes(model)
    assert fp16 == 2 * sum(
        m.weight.numel() for m in base.modules() if isinstance(m, (nn.Linear, nn.Embedding))
    )
    assert delta_compression_vs_fp16(model) >= 15.5
