"""int8/int4 quantization (weight-only per channel or group, and dynamic): maths, save/load round trip, size,
how a compressed directory says it is loaded, and the KL fidelity metric (tiny Llama, CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantLinear
from transformers import LlamaConfig, LlamaForCausalLM

from components.compression.methods import compressed_method, load_compressed
from components.compression.quantize import (
    INT4_FILE,
    INT8_FILE,
    Int4WeightOnlyLinear,
    Int8WeightOnlyLinear,
    dequantize_int4_groups,
    load_int8,
    load_int8_weight,
    mean_token_kl,
    quantize_int4_groups,
    quantize_int4_weight,
    quantize_int8_dynamic,
    quantize_int8_per_channel,
    quantize_int8_weight,
    save_int8,
    save_int8_weight,
    save_weight_only,
)
from components.models.loading import dir_size

VOCAB = 64


def _tiny_llama(tie_word_embeddings: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=tie_word_embeddings,
    )
    return LlamaForCausalLM(config).eval()


def _mark(model_dir: Path, quantization: str) -> None:
    """What the compress stage writes last: config.yaml naming the method."""
    (Path(model_dir) / "config.yaml").write_text(
        yaml.safe_dump({"method": quantization, "n_fidelity_prompts": 8}, sort_keys=False)
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    model = _tiny_llama()
    qmodel = quantize_int8_dynamic(model)
    int8_dir = tmp_path_factory.mktemp("int8")
    path = save_int8(qmodel, int8_dir)
    model.config.save_pretrained(int8_dir)
    _mark(int8_dir, "int8_dynamic")
    float_dir = tmp_path_factory.mktemp("float")
    model.save_pretrained(float_dir)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 12), generator=g)
    return {
        "model": model,
        "qmodel": qmodel,
        "int8_dir": int8_dir,
        "int8_path": path,
        "float_dir": float_dir,
        "ids": ids,
    }


@pytest.fixture
def poison_uninitialized_memory():
    """Make torch.empty() fill floats with NaN, so reading uninitialised memory fails every time
    instead of only when the allocator happens to hand back a block holding the right values."""
    was_on, was_warn = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    was_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_on, warn_only=was_warn)
        torch.utils.deterministic.fill_uninitialized_memory = was_fill


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


def _quantized_linears(model: nn.Module) -> dict[str, DynamicQuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, DynamicQuantLinear)}


def test_quantize_replaces_every_linear_and_leaves_the_original(models):
    model, qmodel = models["model"], models["qmodel"]
    float_linears = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    assert float_linears  # attention/MLP projections and lm_head
    assert set(_quantized_linears(qmodel)) == float_linears
    assert not any(type(m) is nn.Linear for m in qmodel.modules())
    # inplace=False: the float model is untouched
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n in float_linears)


def test_quantized_logits_are_close_to_but_not_equal_float(models):
    ref = _logits(models["model"], models["ids"])
    out = _logits(models["qmodel"], models["ids"])
    assert out.shape == ref.shape
    assert not torch.equal(out, ref)  # int8 weights really are used
    assert torch.isfinite(out).all()
    err = (out - ref).abs().max().item()
    assert err < 0.1 * ref.abs().max().item()
    # the model's prediction hardly moves
    agreement = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agreement > 0.8


def test_save_int8_writes_int8_weights_and_no_float_copies(models):
    path = models["int8_path"]
    assert path == Path(models["int8_dir"]) / INT8_FILE and path.is_file()
    tensors = load_file(str(path))
    linears = _quantized_linears(models["qmodel"])
    for name in linears:
        assert tensors[f"{name}.qweight"].dtype == torch.int8
        assert tensors[f"{name}.scales"].dtype == torch.float32
        assert f"{name}.weight" not in tensors  # no float shadow copy of a quantized weight
    assert tensors["model.embed_tokens.weight"].dtype == torch.float32  # embeddings stay float


def test_int8_file_is_smaller_than_float_weights(models):
    int8_bytes = models["int8_path"].stat().st_size
    float_bytes = (Path(models["float_dir"]) / "model.safetensors").stat().st_size
    assert int8_bytes < float_bytes
    assert dir_size(models["int8_dir"]) == int8_bytes
    assert dir_size(models["float_dir"]) == float_bytes


def test_load_int8_restores_weights_exactly(models):
    loaded = load_int8(models["int8_dir"])
    qmodel = models["qmodel"]
    ours, theirs = _quantized_linears(loaded), _quantized_linears(qmodel)
    assert set(ours) == set(theirs)
    for name, module in theirs.items():
        w_ref, b_ref = module._packed_params._weight_bias()
        w, b = ours[name]._packed_params._weight_bias()
        assert torch.equal(w.int_repr(), w_ref.int_repr()), name
        assert torch.equal(w.dequantize(), w_ref.dequantize()), name
        assert (b is None) == (b_ref is None)
    ref_state = {
        k: v for k, v in qmodel.state_dict().items() if isinstance(v, torch.Tensor) and not v.is_quantized
    }
    got_state = loaded.state_dict()
    for key, value in ref_state.items():
        if key.endswith("_packed_params.dtype"):
            continue
        assert torch.equal(got_state[key], value), key
    assert not loaded.training


def test_load_int8_reproduces_the_saved_model(models, poison_uninitialized_memory):
    # Includes the non-persistent buffers (rotary inv_freq), which are not in the file: a loader that
    # materialises a meta-device skeleton with to_empty() leaves them uninitialised (NaN here).
    loaded = load_int8(models["int8_dir"])
    for (name, buf), (_, ref) in zip(loaded.named_buffers(), models["qmodel"].named_buffers(), strict=True):
        assert torch.equal(buf, ref), name
    out = _logits(loaded, models["ids"])
    assert torch.allclose(out, _logits(models["qmodel"], models["ids"]), atol=1e-6, rtol=0)
    assert not torch.equal(out, _logits(models["model"], models["ids"]))


def test_load_compressed_reads_dynamic_int8_from_config_yaml(models):
    assert compressed_method(models["int8_dir"]) == "int8_dynamic"
    assert _quantized_linears(load_compressed(models["int8_dir"]))


def test_load_int8_reports_missing_tensors(models, tmp_path):
    tensors = load_file(str(models["int8_path"]))
    del tensors["model.embed_tokens.weight"]
    save_file(tensors, str(tmp_path / INT8_FILE))
    models["model"].config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model.embed_tokens.weight"):
        load_int8(tmp_path)


def test_mean_token_kl(models):
    model, qmodel = models["model"], models["qmodel"]
    seqs = models["ids"].tolist()
    assert mean_token_kl(model, model, seqs) == 0.0
    kl_q = mean_token_kl(model, qmodel, seqs)
    assert kl_q > 0.0
    # a much worse copy (different random init) is much further away than the int8 copy
    torch.manual_seed(123)
    other = LlamaForCausalLM(model.config).eval()
    assert mean_token_kl(model, other, seqs) > 10 * kl_q


def test_mean_token_kl_is_mean_over_tokens(models):
    model, qmodel = models["model"], models["qmodel"]
    seq = models["ids"][0].tolist()
    single = mean_token_kl(model, qmodel, [seq])
    # the same sequence twice has the same per-token mean
    assert mean_token_kl(model, qmodel, [seq, seq]) == pytest.approx(single, rel=1e-6)
    assert mean_token_kl(model, qmodel, []) == 0.0


# --------------------------------------------------------------------------- int8_weight (weight-only)

# Hand case: row 0 has max |w| = 31.75, so scale = 31.75 / 127 = 0.25 exactly; row 1 is all zero
# (scale 1, nothing divides by zero); row 2 has max |w| = 12.7, scale 0.1.
HAND_W = torch.tensor(
    [
        [31.75, -10.0, 0.3, 0.0],  # / 0.25 -> 127, -40, 1.2 -> 1, 0
        [0.0, 0.0, 0.0, 0.0],
        [-12.7, 5.0, 1.0, -0.04],  # / 0.1 -> -127, 50, 10, -0.4 -> 0
    ]
)
HAND_Q = torch.tensor([[127, -40, 1, 0], [0, 0, 0, 0], [-127, 50, 10, 0]], dtype=torch.int8)
HAND_SCALE = torch.tensor([0.25, 1.0, 0.1])


def test_per_channel_scale_is_row_max_over_127_on_a_hand_case():
    q, scale = quantize_int8_per_channel(HAND_W)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert scale.shape == (3,)
    torch.testing.assert_close(scale, HAND_SCALE, rtol=1e-6, atol=0)
    assert torch.equal(q, HAND_Q)
    assert q.abs().max() == 127  # the row maximum maps to +-127; -128 is never used (symmetric)


def test_round_trip_error_is_at_most_half_a_step_per_row():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 48, generator=g)
    w[3, 7] = 500.0  # an outlier in one row stretches that row's scale only
    q, scale = quantize_int8_per_channel(w)
    torch.testing.assert_close(scale, w.abs().amax(1) / 127)
    err = (q.float() * scale[:, None] - w).abs()
    assert (err <= scale[:, None] / 2 * (1 + 1e-5)).all()
    others = [r for r in range(16) if r != 3]
    assert err[others].max() < 3.0 / 127  # |w| < ~5 there: far below row 3's step of 500 / 127
    assert err[3].max() > err[others].max()


def test_layer_output_equals_the_dequantized_matmul():
    linear = nn.Linear(4, 3)
    with torch.no_grad():
        linear.weight.copy_(HAND_W)
        linear.bias.copy_(torch.tensor([0.5, 0.0, -1.0]))
    layer = Int8WeightOnlyLinear.from_linear(linear)
    assert torch.equal(layer.qweight, HAND_Q)
    x = torch.tensor([[1.0, 2.0, 0.0, 0.0], [0.0, 0.0, 1.0, -1.0]])
    # by hand: 0.25*(127 - 80) + 0.5 = 12.25; 0; 0.1*(-127 + 100) - 1 = -3.7; row 2: 0.25*1+0.5; 0; 0.1*10-1
    expected = torch.tensor([[12.25, 0.0, -3.7], [0.75, 0.0, 0.0]])
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)
    dequantized = layer.qweight.float() * layer.scale[:, None]
    assert torch.equal(layer.dequantize(), dequantized)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, dequantized, layer.bias))
    no_bias = Int8WeightOnlyLinear.from_linear(nn.Linear(4, 3, bias=False))
    assert no_bias.bias is None and no_bias(x).shape == (2, 3)


def test_weight_only_is_robust_to_an_activation_outlier_that_breaks_dynamic_int8():
    # SmolLM2's down_proj sees |x| ~ 3100 in one feature of a few tokens. Per-tensor activation
    # quantization (dynamic_int8) then uses a step of ~3000/127 for the whole batch, rounding every
    # other token's inputs to zero; weight-only leaves activations alone.
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    x = torch.randn(8, 64)
    x[0, 5] = 3000.0  # one outlier, in token 0
    ref = linear(x).detach()

    def rel_err_other_tokens(out: torch.Tensor) -> float:
        return ((out[1:] - ref[1:]).norm() / ref[1:].norm()).item()

    weight_only = rel_err_other_tokens(Int8WeightOnlyLinear.from_linear(linear)(x))
    dynamic = rel_err_other_tokens(quantize_int8_dynamic(nn.Sequential(linear))(x))
    assert weight_only < 0.01  # measured 0.004
    assert dynamic > 0.5  # measured 0.99: the other tokens' outputs are mostly lost


@pytest.fixture(scope="module")
def weight_only(tmp_path_factory) -> dict:
    model = _tiny_llama()
    qmodel = quantize_int8_weight(model)
    out = tmp_path_factory.mktemp("int8_weight")
    path = save_int8_weight(qmodel, out)
    model.config.save_pretrained(out)
    _mark(out, "int8_weight")
    ids = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(1))
    return {"model": model, "qmodel": qmodel, "dir": out, "path": path, "ids": ids}


def test_quantize_int8_weight_replaces_every_linear_and_leaves_the_original(weight_only):
    model, qmodel = weight_only["model"], weight_only["qmodel"]
    float_linears = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    assert "lm_head" in float_linears
    assert {n for n, m in qmodel.named_modules() if isinstance(m, Int8WeightOnlyLinear)} == float_linears
    assert not any(type(m) is nn.Linear for m in qmodel.modules())
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n in float_linears)
    layer = qmodel.get_submodule("model.layers.0.mlp.down_proj")
    q, scale = quantize_int8_per_channel(model.get_submodule("model.layers.0.mlp.down_proj").weight)
    assert torch.equal(layer.qweight, q) and torch.equal(layer.scale, scale)


def test_int8_weight_logits_are_close_to_float(weight_only):
    ref = _logits(weight_only["model"], weight_only["ids"])
    out = _logits(weight_only["qmodel"], weight_only["ids"])
    assert not torch.equal(out, ref)
    assert (out - ref).abs().max().item() < 0.02 * ref.abs().max().item()
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean().item() > 0.9
    assert mean_token_kl(weight_only["model"], weight_only["qmodel"], weight_only["ids"].tolist()) < 1e-4


def test_save_int8_weight_writes_int8_weights_scales_and_no_float_copies(weight_only):
    tensors = load_file(str(weight_only["path"]))
    quantized = [n for n, m in weight_only["qmodel"].named_modules() if isinstance(m, Int8WeightOnlyLinear)]
    for name in quantized:
        assert tensors[f"{name}.qweight"].dtype == torch.int8
        assert tensors[f"{name}.scale"].dtype == torch.float32
        assert tensors[f"{name}.scale"].shape == (tensors[f"{name}.qweight"].shape[0],)
        assert f"{name}.weight" not in tensors
    assert tensors["model.embed_tokens.weight"].dtype == torch.float32
    float_dir = Path(weight_only["dir"]) / "float"
    weight_only["model"].save_pretrained(float_dir)
    assert weight_only["path"].stat().st_size < dir_size(float_dir)


def test_load_compressed_reads_int8_weight_from_config_yaml(weight_only, poison_uninitialized_memory):
    assert compressed_method(weight_only["dir"]) == "int8_weight"
    loaded = load_compressed(weight_only["dir"])
    assert not loaded.training
    for name, module in weight_only["qmodel"].named_modules():
        if isinstance(module, Int8WeightOnlyLinear):
            got = loaded.get_submodule(name)
            assert isinstance(got, Int8WeightOnlyLinear)
            assert torch.equal(got.qweight, module.qweight) and torch.equal(got.scale, module.scale), name
    for (name, buf), (_, ref) in zip(
        loaded.named_buffers(), weight_only["qmodel"].named_buffers(), strict=True
    ):
        assert torch.equal(buf, ref), name  # incl. rotary inv_freq, which is not in the file
    assert torch.equal(
        _logits(loaded, weight_only["ids"]), _logits(weight_only["qmodel"], weight_only["ids"])
    )


def test_int8_weight_keeps_a_tied_lm_head_tied_and_in_float(tmp_path):
    model = _tiny_llama(tie_word_embeddings=True)
    qmodel = quantize_int8_weight(model)
    assert type(qmodel.lm_head) is nn.Linear
    assert qmodel.lm_head.weight is qmodel.model.embed_tokens.weight
    assert isinstance(qmodel.get_submodule("model.layers.0.self_attn.q_proj"), Int8WeightOnlyLinear)
    save_int8_weight(qmodel, tmp_path)
    model.config.save_pretrained(tmp_path)
    assert len([k for k in load_file(str(tmp_path / INT8_FILE)) if k.endswith("embed_tokens.weight")]) <= 1
    loaded = load_int8_weight(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    assert torch.equal(_logits(loaded, ids), _logits(qmodel, ids))


def test_load_compressed_none_loads_the_merged_model(weight_only, tmp_path):
    weight_only["model"].save_pretrained(tmp_path / "merged")
    _mark(tmp_path, "none")
    loaded = load_compressed(tmp_path)
    assert not any(isinstance(m, Int8WeightOnlyLinear) for m in loaded.modules())
    ids = weight_only["ids"]
    assert torch.equal(_logits(loaded, ids), _logits(weight_only["model"], ids))


def test_load_compressed_needs_config_yaml_and_a_matching_file(weight_only, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        load_compressed(tmp_path)  # no sniffing: without config.yaml the format is unknown
    _mark(tmp_path, "int8_4bit")
    with pytest.raises(ValueError, match="int8_4bit"):
        load_compressed(tmp_path)
    _mark(tmp_path, "int8_weight")
    with pytest.raises(FileNotFoundError, match=INT8_FILE):
        load_compressed(tmp_path)
    # config.yaml and the weights file disagree: an error, not a silent misread
    with pytest.raises(ValueError, match="int8_dynamic"):
        load_compressed(weight_only["dir"], "int8_dynamic")


def test_load_int8_weight_reports_missing_tensors(weight_only, tmp_path):
    tensors = load_file(str(weight_only["path"]))
    del tensors["model.layers.0.mlp.down_proj.scale"]
    save_file(tensors, str(tmp_path / INT8_FILE), metadata={"format": "posttrain-int8-weight"})
    weight_only["model"].config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="down_proj.scale"):
        load_int8_weight(tmp_path)


# ----------------------------------------------------------------- int4_weight


def test_int4_packs_two_weights_per_byte_and_rounds_to_the_nearest_step():
    # one group of 4 inputs: max |w| = 7 -> scale 1, so the int4 values are the rounded weights
    w = torch.tensor([[7.0, -3.2, 0.4, -8.0], [1.0, 2.0, -1.0, 0.0]])
    packed, scale = quantize_int4_groups(w, group_size=4)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 2)
    assert torch.equal(scale, torch.tensor([[8.0 / 7], [2.0 / 7]]))
    # row 0 in steps of 8/7: [6.125, -2.8, 0.35, -7] -> [6, -3, 0, -7], stored +8, low nibble first
    assert packed[0].tolist() == [(6 + 8) | ((-3 + 8) << 4), (0 + 8) | ((-7 + 8) << 4)]
    back = dequantize_int4_groups(packed, scale, in_features=4)
    assert torch.allclose(back[0], torch.tensor([6, -3, 0, -7]) * (8.0 / 7))
    assert (back - w).abs().max() <= scale.max() / 2 + 1e-6


def test_int4_groups_bound_the_error_per_group_and_odd_widths_round_trip():
    torch.manual_seed(0)
    w = torch.randn(6, 64)
    w[:, :32] *= 100  # one loud group must not coarsen the quiet one
    packed, scale = quantize_int4_groups(w, group_size=32)
    back = dequantize_int4_groups(packed, scale, 64)
    assert scale.shape == (6, 2)
    assert (back[:, 32:] - w[:, 32:]).abs().max() <= scale[:, 1].max() / 2 + 1e-6
    odd = torch.randn(3, 7)  # 7 inputs: one group per row, the last byte half padding
    packed, scale = quantize_int4_groups(odd, group_size=7)
    assert packed.shape == (3, 4)
    assert (dequantize_int4_groups(packed, scale, 7) - odd).abs().max() <= scale.max() / 2 + 1e-6


def test_int4_weight_model_round_trips_and_stores_half_of_int8(tmp_path):
    model = _tiny_llama(tie_word_embeddings=True)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    q4 = quantize_int4_weight(model)
    assert any(isinstance(m, Int4WeightOnlyLinear) for m in q4.modules())
    assert q4.lm_head.weight is q4.model.embed_tokens.weight  # tied head stays tied, full precision
    save_weight_only(q4, tmp_path, "int4_weight")
    model.config.save_pretrained(tmp_path)
    _mark(tmp_path, "int4_weight")
    loaded = load_compressed(tmp_path)
    assert torch.equal(_logits(loaded, ids), _logits(q4, ids))
    tensors = load_file(str(tmp_path / INT4_FILE))
    qweights = {k: v for k, v in tensors.items() if k.endswith(".qweight")}
    assert qweights and all(v.dtype == torch.uint8 for v in qweights.values())
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    assert sum(v.numel() for v in qweights.values()) * 2 == sum(m.weight.numel() for m in linears.values())
    save_int8_weight(quantize_int8_weight(model), tmp_path)

    def quantized_bytes(path: Path) -> int:  # int weights + their scales; the fp32 rest is shared
        tensors = load_file(str(path))
        return sum(
            v.numel() * v.element_size() for k, v in tensors.items() if k.endswith((".qweight", ".scale"))
        )

    # 0.5 byte per weight + a 4-byte scale per 32, vs 1 byte + a 4-byte scale per row
    assert quantized_bytes(tmp_path / INT4_FILE) < 0.6 * quantized_bytes(tmp_path / INT8_FILE)
    assert dir_size(tmp_path, INT4_FILE) < dir_size(tmp_path, INT8_FILE)
    assert mean_token_kl(model, loaded, [[1, 2, 3, 4, 5, 6]]) > 0  # lossy, but a real model
