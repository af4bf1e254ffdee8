"""bitsandbytes ``nf4`` / ``llm_int8`` through transformers on the CPU: quantize, save, reload,
what the saved file holds, fidelity, size accounting, generation, outlier handling, and the
errors (tiny Llama, bitsandbytes' CPU backend)."""

from __future__ import annotations

import json
import sys

import bitsandbytes as bnb
import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from components.compression.bnb import (
    BNB_METHODS,
    BnbUnavailableError,
    bnb_config,
    bnb_method,
    load_bnb,
    quantize_bnb,
    quantized_weight_bytes,
    save_bnb,
)
from components.compression.quantize import mean_token_kl
from components.evaluation.generate import generate
from components.models import tiny

VOCAB = 64
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# (max mean-token KL to fp32, max saved-file share of the fp32 file); measured on this model:
# KL nf4 0.032 (int4_weight gets 0.028), llm_int8 0.0002; files 30% and 35% of fp32.
LIMITS = {"nf4": (0.05, 0.40), "llm_int8": (0.002, 0.60)}


def _llama(vocab: int = VOCAB, tied: bool = False, seed: int = 0) -> LlamaForCausalLM:
    """Hidden 64: every linear's in_features is a whole number of nf4's 64-weight blocks.

    ``initializer_range=0.1`` (not 0.02) so the random model's next-token distributions are not
    nearly uniform, which would make any quantization look perfect by KL.
    """
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.1,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config).eval()


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def fp32(tmp_path_factory) -> dict:
    model = _llama()
    merged = tmp_path_factory.mktemp("merged")
    model.save_pretrained(merged)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (4, 16), generator=g)
    return {"model": model, "dir": merged, "ids": ids, "logits": _logits(model, ids)}


@pytest.fixture(scope="module", params=BNB_METHODS)
def quantized(request, fp32, tmp_path_factory) -> dict:
    """Quantize, run it once (as the compress stage does before saving), save, reload."""
    method = request.param
    model = quantize_bnb(fp32["dir"], method)
    logits = _logits(model, fp32["ids"])
    out = tmp_path_factory.mktemp(method)
    path = save_bnb(model, out)
    return {"method": method, "model": model, "logits": logits, "dir": out, "path": path}


def test_reloaded_model_gives_the_in_memory_logits(quantized, fp32) -> None:
    reloaded = load_bnb(quantized["dir"])
    assert not reloaded.training
    torch.testing.assert_close(_logits(reloaded, fp32["ids"]), quantized["logits"], rtol=0, atol=1e-6)
    torch.testing.assert_close(_logits(quantized["model"], fp32["ids"]), quantized["logits"], rtol=0, atol=0)


def test_close_to_fp32_but_really_quantized(quantized, fp32) -> None:
    max_kl, _ = LIMITS[quantized["method"]]
    reloaded = load_bnb(quantized["dir"])
    kl = mean_token_kl(fp32["model"], reloaded, fp32["ids"].tolist())
    assert 1e-6 < kl < max_kl
    assert (quantized["logits"] - fp32["logits"]).abs().max() > 1e-3  # not the fp32 model


def test_saved_file_holds_quantized_linears_and_full_precision_head(quantized, fp32) -> None:
    method = quantized["method"]
    with safe_open(str(quantized["path"]), "pt") as fh:
        keys = set(fh.keys())
        dtypes = {k: fh.get_tensor(k).dtype for k in keys}
    for layer in range(2):
        for name in LINEARS:
            module = "mlp" if name.endswith(("gate_proj", "up_proj", "down_proj")) else "self_attn"
            prefix = f"model.layers.{layer}.{module}.{name}"
            if method == "nf4":
                assert dtypes[f"{prefix}.weight"] == torch.uint8
                assert dtypes[f"{prefix}.weight.absmax"] == torch.uint8  # double quant: absmax in 8 bits
                assert f"{prefix}.weight.nested_absmax" in keys
                assert f"{prefix}.weight.quant_state.bitsandbytes__nf4" in keys
            else:
                assert dtypes[f"{prefix}.weight"] == torch.int8
                assert dtypes[f"{prefix}.SCB"] == torch.float32
    assert dtypes["lm_head.weight"] == torch.float32
    _, max_share = LIMITS[method]
    assert quantized["path"].stat().st_size < max_share * (fp32["dir"] / "model.safetensors").stat().st_size
    qcfg = json.loads((quantized["dir"] / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "bitsandbytes" and qcfg["llm_int8_skip_modules"] == ["lm_head"]
    if method == "nf4":
        assert qcfg["load_in_4bit"] and qcfg["bnb_4bit_quant_type"] == "nf4"
        assert qcfg["bnb_4bit_use_double_quant"] and qcfg["bnb_4bit_compute_dtype"] == "float32"
    else:
        assert qcfg["load_in_8bit"] and qcfg["llm_int8_threshold"] == 6.0
    assert bnb_method(quantized["dir"]) == method


def test_quantized_weight_bytes_ratio(quantized) -> None:
    q_model, fp16_model = quantized_weight_bytes(quantized["model"])
    assert (q_model, fp16_model) == quantized_weight_bytes(quantized["dir"])
    assert fp16_model == 2 * 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64)  # 2 layers' linears, no head
    ratio = q_model / fp16_model
    if quantized["method"] == "nf4":
        assert 0.25 < ratio <= 0.28  # 4 bits + an 8-bit absmax per 64 + fp32 per 256 blocks: 0.2586
    else:
        assert 0.5 < ratio < 0.56  # int8 + an fp32 scale per row: 0.5 + 2 / in_features = 0.528


@pytest.mark.parametrize("quantized", ["nf4"], indirect=True)  # only bnb.nn.Linear4bit repacks
def test_cpu_repack_stays_off(quantized, fp32) -> None:
    """On an AVX512-BF16 CPU the first eval forward would repack nf4 layers to bf16 (see bnb.py);
    the round-trip test above then fails too, since saving re-quantizes the repacked absmaxes."""
    for model in (quantized["model"], load_bnb(quantized["dir"])):
        layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert len(layers) == 2 * len(LINEARS)
        _logits(model, fp32["ids"])
        for layer in layers:
            assert getattr(layer, "support_avx512bf16_for_cpu", False) is False
            assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)


def test_tied_head_stays_tied_and_full_precision(tmp_path) -> None:
    merged = tmp_path / "merged"
    _llama(tied=True).save_pretrained(merged)
    model = quantize_bnb(merged, "nf4")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    save_bnb(model, tmp_path / "nf4")
    reloaded = load_bnb(tmp_path / "nf4")
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert reloaded.lm_head.weight.dtype == torch.float32


def test_llm_int8_outlier_columns_are_kept_out_of_int8(tmp_path) -> None:
    """A norm channel 40x the rest gives every linear one outlier input column, as real LLMs have.

    With the 6.0 threshold those columns are multiplied in fp16; with 0 they share the row's int8
    scale and drown the rest (measured KL 0.0008 vs 0.0048).
    """
    model = _llama()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[5] = 40.0
            layer.post_attention_layernorm.weight[9] = 40.0
    model.save_pretrained(tmp_path)
    sequences = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1)).tolist()
    quantized = quantize_bnb(tmp_path, "llm_int8")
    kl_threshold = mean_token_kl(model, quantized, sequences)
    for module in quantized.modules():
        if isinstance(module, bnb.nn.Linear8bitLt):
            assert module.state.threshold == 6.0
            module.state.threshold = 0.0
    kl_no_outliers = mean_token_kl(model, quantized, sequences)
    assert kl_threshold < kl_no_outliers / 3


def test_generate_runs_on_the_reloaded_nf4_model(tmp_path) -> None:
    lines = ["what is 2 + 3 ?", "reverse abc", "upper case cat", "the capital of france is paris"] * 4
    tokenizer = tiny.build_tokenizer(lines, 300)
    model = _llama(vocab=len(tokenizer))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(tmp_path / "merged")
    quantized = quantize_bnb(tmp_path / "merged", "nf4")
    prompts = ["what is 2 + 3 ?", "reverse abc"]
    expected = generate(quantized, tokenizer, prompts, max_new_tokens=5)
    save_bnb(quantized, tmp_path / "nf4")
    outputs = generate(load_bnb(tmp_path / "nf4"), tokenizer, prompts, max_new_tokens=5)
    assert outputs == expected
    assert len(outputs) == 2 and all(len(o) == 1 and isinstance(o[0], str) for o in outputs)
    assert any(o[0] for o in outputs)


def test_unknown_method_is_refused(fp32) -> None:
    with pytest.raises(ValueError, match="compress.method 'int3'"):
        quantize_bnb(fp32["dir"], "int3")
    with pytest.raises(ValueError, match="compress.method 'fp4'"):
        bnb_config("fp4")


def test_a_full_precision_checkpoint_is_not_taken_for_a_quantized_one(fp32) -> None:
    with pytest.raises(ValueError, match="no bitsandbytes quantization_config"):
        load_bnb(fp32["dir"])  # would otherwise load silently as fp32
    with pytest.raises(ValueError, match="no bitsandbytes-quantized linear layers"):
        quantized_weight_bytes(fp32["dir"])
    with pytest.raises(ValueError, match="LlamaForCausalLM: no bitsandbytes-quantized linear layers"):
        quantized_weight_bytes(fp32["model"])


def test_missing_bitsandbytes_is_one_clear_line(fp32, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    with pytest.raises(BnbUnavailableError, match="compress.method: nf4 needs bitsandbytes"):
        quantize_bnb(fp32["dir"], "nf4")


@pytest.mark.parametrize(
    ("method", "kernel"), [("nf4", "quantize_4bit"), ("llm_int8", "int8_vectorwise_quant")]
)
def test_bitsandbytes_that_cannot_quantize_here_is_one_clear_line(fp32, monkeypatch, method, kernel) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(bnb.functional, kernel, broken)
    with pytest.raises(
        BnbUnavailableError, match=f"compress.method: {method}: bitsandbytes .* cannot quantize"
    ):
        quantize_bnb(fp32["dir"], method)
