"""Dynamic int8 quantization: save/load round trip, size, and the KL fidelity metric (tiny Llama, CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantLinear
from transformers import LlamaConfig, LlamaForCausalLM

from components.compression.quantize import (
    INT8_FILE,
    dir_size,
    load_compressed,
    load_int8,
    mean_token_kl,
    quantize_dynamic_int8,
    save_int8,
)

VOCAB = 64


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    model = _tiny_llama()
    qmodel = quantize_dynamic_int8(model)
    int8_dir = tmp_path_factory.mktemp("int8")
    path = save_int8(qmodel, int8_dir)
    model.config.save_pretrained(int8_dir)
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


def test_load_compressed_prefers_the_int8_file(models):
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
