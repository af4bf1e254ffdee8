"""Pruning: magnitude and N:M masks (hand cases and a tiny Llama), masked recovery fine-tuning,
structured MLP channel slicing through save_pretrained/from_pretrained, and the sparse file format."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from components.compression.prune import (
    SPARSE_FILE,
    causal_lm_loss,
    load_sparse,
    magnitude_prune,
    mlp_channel_importance,
    mlp_channels_to_keep,
    n_m_prune,
    pad_batch,
    prunable_linears,
    prune_mlp_channels,
    recovery_finetune,
    save_sparse,
    sparsity_report,
)

VOCAB = 64


def _tiny_llama(hidden: int = 32, intermediate: int = 64, tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config).eval()


def _ids(seed: int = 1, batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _sequences(n: int = 8, seed: int = 2) -> list[list[int]]:
    """Variable lengths, so batches are padded."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (6 + i % 5,), generator=gen).tolist() for i in range(n)]


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


def _single_linear(weight: list[list[float]]) -> nn.Sequential:
    w = torch.tensor(weight)
    linear = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(w)
    return nn.Sequential(linear)


# ----------------------------------------------------------------- magnitude


def test_magnitude_prunes_the_smallest_weights_of_each_matrix() -> None:
    # |w| sorted: .05 .1 .2 .3 | .4 .5 .6 .7 -> the four smallest go, wherever their row is
    # (per matrix, not per row: row 0 keeps one weight, row 1 three).
    model = _single_linear([[0.1, -0.5, 0.3, -0.05], [0.4, -0.2, 0.6, 0.7]])
    masks = magnitude_prune(model, 0.5)
    expected = torch.tensor([[False, True, False, False], [True, False, True, True]])
    assert torch.equal(masks["0.weight"], expected)
    assert torch.equal(model[0].weight, torch.tensor([[0.0, -0.5, 0.0, 0.0], [0.4, 0.0, 0.6, 0.7]]))


def test_magnitude_ties_are_broken_by_position() -> None:
    model = _single_linear([[1.0, -1.0, 1.0, -1.0]])
    masks = magnitude_prune(model, 0.5)
    assert masks["0.weight"].tolist() == [[False, False, True, True]]


@pytest.mark.parametrize("sparsity", [0.5, 0.3])
def test_magnitude_reaches_the_requested_sparsity(sparsity: float) -> None:
    model = _tiny_llama()
    masks = magnitude_prune(model, sparsity)
    linears = prunable_linears(model)
    assert set(masks) == {f"{name}.weight" for name in linears}
    assert "lm_head.weight" in masks  # untied: an ordinary linear
    for name, mask in masks.items():
        assert abs(int((~mask).sum()) - sparsity * mask.numel()) <= 0.5, name
        assert torch.equal(model.get_parameter(name) == 0, ~mask), name
    report = sparsity_report(model)
    assert report["prunable_params"] == sum(m.numel() for m in masks.values())
    assert report["zero_params"] == sum(int((~m).sum()) for m in masks.values())
    assert abs(report["sparsity"] - sparsity) <= 0.5 * len(masks) / report["prunable_params"]
    assert report["total_params"] == sum(p.numel() for p in model.parameters())


def test_magnitude_leaves_tied_head_and_embeddings_alone() -> None:
    model = _tiny_llama(tie=True)
    embeddings = model.get_input_embeddings().weight.detach().clone()
    masks = magnitude_prune(model, 0.5)
    assert "lm_head.weight" not in masks and not any("embed" in name for name in masks)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert torch.equal(model.get_input_embeddings().weight, embeddings)
    assert sparsity_report(model)["prunable_params"] == sum(m.numel() for m in masks.values())


def test_magnitude_rejects_a_sparsity_outside_0_1() -> None:
    with pytest.raises(ValueError, match="compress.prune.sparsity"):
        magnitude_prune(_tiny_llama(), 1.0)


# ----------------------------------------------------------------- N:M


def test_two_four_keeps_the_two_largest_of_each_group() -> None:
    model = _single_linear(
        [[0.1, -0.9, 0.5, 0.2, 3.0, -1.0, 2.0, 0.5], [1.0, 1.0, -1.0, 1.0, 0.0, 0.0, 0.0, 0.1]]
    )
    masks = n_m_prune(model, 2, 4)
    expected = [
        [False, True, True, False, True, False, True, False],
        [True, True, False, False, True, False, False, True],  # ties: the earlier input wins
    ]
    assert masks["0.weight"].tolist() == expected
    assert model[0].weight[0].tolist() == pytest.approx([0, -0.9, 0.5, 0, 3.0, 0, 2.0, 0])


def test_two_four_on_a_llama_has_two_zeros_in_every_group() -> None:
    model = _tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = n_m_prune(model, 2, 4)
    assert set(masks) == {f"{name}.weight" for name in prunable_linears(model)}
    for name, mask in masks.items():
        groups = model.get_parameter(name).reshape(-1, 4)
        assert ((groups == 0).sum(dim=1) == 2).all(), name
        keep, magnitude = mask.reshape(-1, 4), before[name].reshape(-1, 4).abs()
        kept_min = magnitude.masked_fill(~keep, float("inf")).amin(dim=1)
        pruned_max = magnitude.masked_fill(keep, -1.0).amax(dim=1)
        assert (kept_min >= pruned_max).all(), name
    assert sparsity_report(model)["sparsity"] == 0.5


def test_n_m_rejects_inputs_it_does_not_divide_and_changes_nothing() -> None:
    model = _single_linear([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    with pytest.raises(ValueError, match=r"compress\.prune\.n_m"):
        n_m_prune(model, 2, 4)
    assert model[0].weight.tolist() == [[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]


# ----------------------------------------------------------------- recovery


def _mean_loss(model: nn.Module, sequences: list[list[int]]) -> float:
    ids, mask = pad_batch(sequences)
    with torch.no_grad():
        return causal_lm_loss(model, ids, mask).item()


def test_padding_does_not_change_the_loss() -> None:
    model = _tiny_llama()
    seq = _sequences(1)[0]
    alone = _mean_loss(model, [seq])
    ids, mask = pad_batch([seq, seq + [5, 6, 7]])
    with torch.no_grad():
        padded = causal_lm_loss(model, ids[:1], mask[:1]).item()
    assert padded == pytest.approx(alone, abs=1e-6)


def test_recovery_finetune_keeps_pruned_weights_at_zero_and_lowers_the_loss() -> None:
    model = _tiny_llama()
    masks = magnitude_prune(model, 0.5)
    before_weights = {n: model.get_parameter(n).detach().clone() for n in masks}
    sequences = _sequences()
    before = _mean_loss(model, sequences)
    history = recovery_finetune(model, masks, sequences, steps=30, learning_rate=1e-2, batch_size=4)
    after = _mean_loss(model, sequences)
    assert len(history) == 30 and all(set(h) == {"step", "loss"} for h in history)
    assert after < before - 0.5
    for name, mask in masks.items():
        weight = model.get_parameter(name).detach()
        assert (weight[~mask] == 0).all(), name
        assert (weight[mask] != before_weights[name][mask]).float().mean() > 0.9, name
    assert sparsity_report(model)["sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_recovery_finetune_runs_without_masks_on_a_sliced_model() -> None:
    model = prune_mlp_channels(_tiny_llama(), 0.5)
    sequences = _sequences()
    before = _mean_loss(model, sequences)
    recovery_finetune(model, {}, sequences, steps=10, learning_rate=1e-2)
    assert _mean_loss(model, sequences) < before


# ----------------------------------------------------------------- structured MLP channels


def _zero_dropped_channels(model: LlamaForCausalLM, keep: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, index in keep.items():
            mlp = model.get_submodule(name)
            dropped = torch.ones(mlp.down_proj.in_features, dtype=torch.bool)
            dropped[index] = False
            mlp.gate_proj.weight[dropped] = 0
            mlp.up_proj.weight[dropped] = 0
            mlp.down_proj.weight[:, dropped] = 0


def test_channel_ranking_drops_dead_and_keeps_strong_channels() -> None:
    model = _tiny_llama()
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        mlp.gate_proj.weight[3] *= 100  # big inputs, but its output column is zero: contributes nothing
        mlp.up_proj.weight[3] *= 100
        mlp.down_proj.weight[:, 3] = 0
        mlp.up_proj.weight[5] *= 100
    scores = mlp_channel_importance(mlp)
    gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    torch.testing.assert_close(scores, gate.norm(dim=1) * up.norm(dim=1) * down.norm(dim=0))
    keep = mlp_channels_to_keep(model, 0.3)["model.layers.0.mlp"]
    assert keep.numel() == 20  # ceil(0.3 * 64)
    assert 3 not in keep.tolist() and 5 in keep.tolist()
    dropped = [i for i in range(64) if i not in keep.tolist()]
    assert scores[keep].min() >= scores[dropped].max()


def test_sliced_mlp_equals_zeroed_channels_and_reloads_smaller(tmp_path: Path) -> None:
    original = _tiny_llama(hidden=64, intermediate=128)
    keep = mlp_channels_to_keep(original, 0.5)
    zeroed = copy.deepcopy(original)
    _zero_dropped_channels(zeroed, keep)
    sliced = prune_mlp_channels(copy.deepcopy(original), 0.5)
    ids = _ids()
    assert not torch.allclose(_logits(zeroed, ids), _logits(original, ids), atol=1e-3)
    torch.testing.assert_close(_logits(sliced, ids), _logits(zeroed, ids), atol=1e-5, rtol=0)
    assert sliced.config.intermediate_size == 64
    for layer in sliced.model.layers:
        assert layer.mlp.gate_proj.weight.shape == (64, 64) == layer.mlp.down_proj.weight.shape

    original.save_pretrained(tmp_path / "dense")
    sliced.save_pretrained(tmp_path / "sliced")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sliced", dtype=torch.float32).eval()
    assert reloaded.config.intermediate_size == 64
    removed = 2 * 3 * 64 * 64  # two layers, three projections, 64 of 128 channels of width 64
    n_original = sum(p.numel() for p in original.parameters())
    assert sum(p.numel() for p in reloaded.parameters()) == n_original - removed
    size = {d: (tmp_path / d / "model.safetensors").stat().st_size for d in ("dense", "sliced")}
    assert size["dense"] - size["sliced"] >= 4 * removed  # fp32 bytes (headers differ a little)
    torch.testing.assert_close(_logits(reloaded, ids), _logits(sliced, ids), atol=0, rtol=0)


def test_keep_ratio_one_changes_nothing() -> None:
    original = _tiny_llama()
    sliced = prune_mlp_channels(copy.deepcopy(original), 1.0)
    ids = _ids()
    assert sliced.config.intermediate_size == 64
    assert torch.equal(_logits(sliced, ids), _logits(original, ids))


def test_keep_ratio_is_checked() -> None:
    with pytest.raises(ValueError, match="compress.prune.keep_ratio"):
        prune_mlp_channels(_tiny_llama(), 0.0)


# ----------------------------------------------------------------- sparse file


def test_sparse_file_round_trips_exactly_and_is_smaller(tmp_path: Path) -> None:
    model = _tiny_llama(tie=True)
    masks = magnitude_prune(model, 0.5)
    model.save_pretrained(tmp_path / "dense")
    path = save_sparse(model, tmp_path / "sparse")
    assert path == tmp_path / "sparse" / SPARSE_FILE
    loaded = load_sparse(tmp_path / "sparse")
    ids = _ids()
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    assert loaded.lm_head.weight is loaded.get_input_embeddings().weight
    assert sparsity_report(loaded) == sparsity_report(model)

    with safe_open(str(path), "pt") as fh:
        assert (fh.metadata() or {})["format"] == "posttrain-sparse"
        assert set(json.loads(fh.metadata()["shapes"])) == set(masks)
        name = "model.layers.0.mlp.up_proj.weight"
        values, packed = fh.get_tensor(f"{name}.values"), fh.get_tensor(f"{name}.mask")
    assert values.dtype == torch.float32 and values.numel() == int(masks[name].sum())
    assert packed.dtype == torch.uint8 and packed.numel() == masks[name].numel() // 8
    dense_bytes = sum(m.numel() * 4 for m in masks.values())
    sparse_bytes = sum(int(m.sum()) * 4 + m.numel() // 8 for m in masks.values())
    assert sparse_bytes / dense_bytes == pytest.approx((0.5 * 4 + 1 / 8) / 4, abs=1e-3)
    dense_file = (tmp_path / "dense" / "model.safetensors").stat().st_size
    assert path.stat().st_size < dense_file - 0.9 * (dense_bytes - sparse_bytes)


def test_unpruned_weights_stay_dense_in_the_sparse_file(tmp_path: Path) -> None:
    model = _tiny_llama()
    path = save_sparse(model, tmp_path)
    with safe_open(str(path), "pt") as fh:
        assert json.loads(fh.metadata()["shapes"]) == {}
    assert torch.equal(_logits(load_sparse(tmp_path), _ids()), _logits(model, _ids()))


def test_load_sparse_refuses_another_format(tmp_path: Path) -> None:
    model = _tiny_llama()
    magnitude_prune(model, 0.5)
    path = save_sparse(model, tmp_path)
    with safe_open(str(path), "pt") as fh:
        tensors = {key: fh.get_tensor(key) for key in fh.keys()}
        metadata = dict(fh.metadata())
    save_file(tensors, str(path), metadata={**metadata, "format": "posttrain-int8-weight"})
    with pytest.raises(ValueError, match="format"):
        load_sparse(tmp_path)
