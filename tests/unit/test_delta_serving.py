"""Many Bit-Delta fine-tunes on one base (DeltaServer): each served delta is its own Bit-Delta
model, switching leaks nothing, memory is base + packed deltas, a foreign delta is refused, and
the HTTP server and ``posttrain deltas`` answer (tiny Llama, word-level tokenizer, CPU)."""

from __future__ import annotations

import copy
import json
import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from components.compression.bitdelta import (
    BITDELTA_FILE,
    base_weights_hash,
    build_bitdelta_model,
    load_bitdelta,
    mean_kl,
    save_bitdelta,
)
from components.compression.delta_serving import (
    DeltaServer,
    DeltaServingError,
    SwitchableEmbedding,
    SwitchableTiedHead,
    UnknownDeltaError,
    build_http_server,
    check_loopback,
)
from components.evaluation.generate import generate

VOCAB = 64
PAD, EOS, UNK = "<|pad|>", "<|end|>", "<unk>"
ROLES = ("<|system|>", "<|user|>", "<|assistant|>")
TEMPLATE = (
    "{%- for message in messages -%}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{%- endfor -%}{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)
PROMPTS = ("w3 w4 w5", "w10 w11", "w7")


def _tokenizer(template: str = TEMPLATE) -> PreTrainedTokenizerFast:
    """A 64-token word-level tokenizer (words ``w0``..``w57``) with a chat template, built offline."""
    specials = [PAD, EOS, UNK, *ROLES]
    vocab = {
        token: i for i, token in enumerate([*specials, *(f"w{i}" for i in range(VOCAB - len(specials)))])
    }
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, pad_token=PAD, unk_token=UNK)
    tokenizer.add_special_tokens({"additional_special_tokens": list(ROLES)})
    tokenizer.chat_template = template
    return tokenizer


def _tiny_llama(tie: bool, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config).eval()
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 1
    return model


@torch.no_grad()
def _fine_tune(base: nn.Module, seed: int, skip: str = "", norms: tuple[str, ...] = ()) -> nn.Module:
    """A stand-in fine-tune: seeded noise on every 2-D weight but ``skip``, and on ``norms``."""
    fine = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    for name, param in fine.named_parameters():  # deduplicated: a tied weight moves once
        if param.dim() == 2 and name != skip:
            param.add_(0.02 * torch.randn(param.shape, generator=g))
    state = fine.state_dict()
    for name in norms:
        state[name].add_(0.2 * torch.randn(state[name].shape, generator=g))
    return fine


def _save_delta(base: nn.Module, fine: nn.Module, out: Path, base_dir: Path, tokenizer: Any) -> Path:
    """A compress-stage-like Bit-Delta output: the delta, config.json, tokenizer, bitdelta.json."""
    save_bitdelta(build_bitdelta_model(base, fine), out, base_weights_hash(base))
    base.config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    (out / "bitdelta.json").write_text(json.dumps({"base_model": str(base_dir)}))
    (out / "config.yaml").write_text("method: bitdelta\n")
    return out


def _family(root: Path, tie: bool) -> dict[str, Any]:
    """A base on disk and two different fine-tunes of it, A and B, saved as Bit-Deltas.

    A moves every matrix and two norms; B leaves ``down_proj`` of layer 1 alone and moves one
    norm, so switching must also put back what only A changed.
    """
    tokenizer = _tokenizer()
    base = _tiny_llama(tie)
    base_dir = root / "base"
    base.save_pretrained(str(base_dir))
    tokenizer.save_pretrained(str(base_dir))
    fine_a = _fine_tune(base, 1, norms=("model.norm.weight", "model.layers.0.input_layernorm.weight"))
    fine_b = _fine_tune(base, 2, skip="model.layers.1.mlp.down_proj.weight", norms=("model.norm.weight",))
    dirs = {
        "a": _save_delta(base, fine_a, root / "a", base_dir, tokenizer),
        "b": _save_delta(base, fine_b, root / "b", base_dir, tokenizer),
    }
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(7, VOCAB, (3, 10), generator=g)
    return {
        "base": base,
        "base_dir": base_dir,
        "fine": {"a": fine_a, "b": fine_b},
        "dirs": dirs,
        "tokenizer": tokenizer,
        "ids": ids,
        "seqs": ids.tolist(),
    }


@pytest.fixture(scope="module")
def tied(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _family(tmp_path_factory.mktemp("tied"), tie=True)


@pytest.fixture(scope="module")
def untied(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _family(tmp_path_factory.mktemp("untied"), tie=False)


@pytest.fixture(scope="module")
def server(tied: dict[str, Any]) -> DeltaServer:
    return DeltaServer(tied["base_dir"], tied["dirs"])


@pytest.fixture(scope="module")
def chat_server(untied: dict[str, Any]) -> DeltaServer:
    """For generation: a random tiny model with a tied head only echoes its last token."""
    return DeltaServer(untied["base_dir"], untied["dirs"])


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


# ----------------------------------------------------------------- the math


@pytest.mark.parametrize("case", ["tied", "untied"])
def test_each_delta_gives_its_own_bitdelta_model_and_is_closer_to_its_own_fine_tune(case, request):
    family = request.getfixturevalue(case)
    served = DeltaServer(family["base_dir"], family["dirs"])
    if case == "tied":  # the embedding is switchable and the LM head follows it
        assert isinstance(served.model.model.embed_tokens, SwitchableEmbedding)
        assert isinstance(served.model.lm_head, SwitchableTiedHead)
        assert served.model.lm_head.source == "model.embed_tokens"
    kls = {}
    for name, directory in family["dirs"].items():
        reference = load_bitdelta(directory, family["base"])
        served.select(name)
        torch.testing.assert_close(
            _logits(served.model, family["ids"]), _logits(reference, family["ids"]), atol=1e-5, rtol=0
        )
        for fine_name, fine in family["fine"].items():
            kls[name, fine_name] = mean_kl(fine, served.model, family["seqs"])
    base_kl = {n: mean_kl(f, family["base"], family["seqs"]) for n, f in family["fine"].items()}
    for own, other in (("a", "b"), ("b", "a")):
        assert kls[own, own] < 0.6 * kls[other, own], kls  # a clear margin (~0.4 measured)
        assert kls[own, own] < base_kl[own], (kls, base_kl)


def test_base_is_exact_and_switching_back_and_forth_leaks_nothing(tied):
    served = DeltaServer(tied["base_dir"], tied["dirs"])
    ids, base = tied["ids"], tied["base"]
    base_logits = _logits(base, ids)
    assert served.active == "base"
    assert torch.equal(_logits(served.model, ids), base_logits)
    served.select("a")
    first_a = _logits(served.model, ids)
    assert not torch.allclose(first_a, base_logits, atol=1e-3)
    norm = served.model.model.norm.weight
    assert torch.equal(norm, tied["fine"]["a"].model.norm.weight)  # dense tensors swapped in
    served.select("b")
    only_a = "model.layers.0.input_layernorm.weight"
    assert torch.equal(served.model.state_dict()[only_a], base.state_dict()[only_a])  # A's put back
    assert served.model.model.layers[1].mlp.down_proj.delta is None  # B has no delta there
    assert not torch.allclose(_logits(served.model, ids), first_a, atol=1e-3)
    served.select("a")
    assert torch.equal(_logits(served.model, ids), first_a)
    served.select(None)
    assert torch.equal(_logits(served.model, ids), base_logits)
    # Back on the base, every tensor is the base's, under the base's names.
    assert served.model.state_dict().keys() == base.state_dict().keys()
    for name, tensor in base.state_dict().items():
        assert torch.equal(served.model.state_dict()[name], tensor), name
    assert base_weights_hash(served.model) == base_weights_hash(base)
    with served.using("b") as model:
        assert served.active == "b" and model is served.model
    assert served.active == "base"


def test_unpacked_cache_gives_the_same_logits_and_is_reported(tied):
    plain = DeltaServer(tied["base_dir"], tied["dirs"])
    cached = DeltaServer(tied["base_dir"], tied["dirs"], cache_active=True)
    for name in ("a", "b", "base"):
        plain.select(name)
        cached.select(name)
        torch.testing.assert_close(
            _logits(cached.model, tied["ids"]), _logits(plain.model, tied["ids"]), atol=1e-6, rtol=0
        )
    assert cached.memory_report()["active_cache_bytes"] == 0  # base selected: nothing unpacked
    cached.select("a")
    matrices = sum(4 * tied["base"].get_submodule(m).weight.numel() for m in cached.deltas["a"].layers)
    assert cached.memory_report()["active_cache_bytes"] == matrices  # fp32, the tied head shares
    assert plain.memory_report()["active_cache_bytes"] == 0


# ----------------------------------------------------------------- memory


def _unique_nbytes(tensors: list[torch.Tensor]) -> int:
    return sum({t.data_ptr(): t.numel() * t.element_size() for t in tensors}.values())


def test_memory_is_the_base_once_plus_the_packed_deltas(server, tied):
    base = tied["base"]
    report = server.memory_report()
    base_bytes = _unique_nbytes([*base.parameters(), *base.buffers()])
    assert report["base_bytes"] == base_bytes
    # No copy of any base weight was made: the served model holds exactly the base's bytes.
    assert _unique_nbytes([*server.model.parameters(), *server.model.buffers()]) == base_bytes
    for name, directory in tied["dirs"].items():
        stored = load_file(str(directory / BITDELTA_FILE))
        held = dict(server.deltas[name].tensors())
        assert held.keys() == stored.keys()
        # Kept as stored: packed uint8 signs, no unpacked ±1 matrix, nothing else.
        assert report["deltas"][name]["bytes"] == sum(t.numel() * t.element_size() for t in stored.values())
        assert all(held[k].dtype == torch.uint8 for k in held if k.endswith(".signs"))
        assert all(t.numel() <= 64 for k, t in held.items() if t.is_floating_point()), "a float matrix"
        matrix_bytes = sum(_unique_nbytes([base.get_submodule(m).weight]) for m in server.deltas[name].layers)
        packed = report["deltas"][name]["sign_bytes"] + report["deltas"][name]["scale_bytes"]
        assert packed < matrix_bytes / 8
        assert report["deltas"][name]["sign_bytes"] == matrix_bytes // 32  # one bit per fp32 weight
    backup = sum(
        base.state_dict()[n].numel() * 4
        for n in ("model.norm.weight", "model.layers.0.input_layernorm.weight")
    )
    assert report["dense_backup_bytes"] == backup
    deltas_bytes = sum(sizes["bytes"] for sizes in report["deltas"].values())
    assert report["total_bytes"] == base_bytes + backup + deltas_bytes
    assert report["materialized_bytes"] == 2 * base_bytes
    assert report["total_bytes"] < 1.2 * base_bytes < report["materialized_bytes"]


# ----------------------------------------------------------------- refusals


def test_a_delta_of_another_base_is_refused_naming_it_and_its_base(tied, tmp_path):
    other_base = _tiny_llama(tie=True, seed=7)
    other_dir = _save_delta(
        other_base, _fine_tune(other_base, 5), tmp_path / "other", tmp_path / "other_base", tied["tokenizer"]
    )
    with pytest.raises(ValueError, match="base") as error:
        DeltaServer(tied["base_dir"], {"a": tied["dirs"]["a"], "stranger": other_dir})
    message = str(error.value)
    assert "'stranger'" in message and str(tmp_path / "other_base") in message
    assert isinstance(error.value, DeltaServingError)


def test_bad_deltas_and_names_fail_with_one_clear_message(tied, tmp_path):
    quantized = tmp_path / "int8"
    quantized.mkdir()
    (quantized / "config.yaml").write_text("method: int8_weight\n")
    with pytest.raises(DeltaServingError, match=r"not a Bit-Delta output.*int8_weight"):
        DeltaServer(tied["base"], {"q": quantized})
    with pytest.raises(DeltaServingError, match="does not exist"):
        DeltaServer(tied["base"], {"gone": tmp_path / "nowhere"})
    with pytest.raises(DeltaServingError, match="bare base"):
        DeltaServer(tied["base"], {"base": tied["dirs"]["a"]})
    served = DeltaServer(copy.deepcopy(tied["base"]), tied["dirs"])
    with pytest.raises(UnknownDeltaError, match=r"'c' \(known: base, a, b\)"):
        served.select("c")


def test_deltas_with_different_tokenizers_are_refused(tied, tmp_path):
    odd = shutil.copytree(tied["dirs"]["b"], tmp_path / "b_odd")
    _tokenizer(TEMPLATE.replace("<|end|>", "")).save_pretrained(str(odd))
    with pytest.raises(DeltaServingError, match="different tokenizers"):
        DeltaServer(tied["base_dir"], {"a": tied["dirs"]["a"], "b": odd})


# ----------------------------------------------------------------- generation


def test_generation_uses_the_selected_delta_and_mixed_requests_are_grouped(chat_server, untied, monkeypatch):
    tokenizer = untied["tokenizer"]
    expected = {
        name: [o[0] for o in generate(load_bitdelta(d, untied["base"]), tokenizer, PROMPTS, max_new_tokens=5)]
        for name, d in untied["dirs"].items()
    }
    expected["base"] = [o[0] for o in generate(untied["base"], tokenizer, PROMPTS, max_new_tokens=5)]
    assert expected["a"] != expected["b"]  # the test can tell the deltas apart
    for name in ("a", "b", "base"):
        assert chat_server.generate(PROMPTS, name, max_new_tokens=5) == expected[name]
    assert chat_server.ask(PROMPTS[1], "a", max_new_tokens=5) == expected["a"][1]

    calls: list[tuple[str | None, int]] = []
    real_generate = chat_server.generate

    def spy(prompts: list[str], delta: str | None = None, **options: Any) -> list[str]:
        calls.append((delta, len(prompts)))
        return real_generate(prompts, delta, **options)

    monkeypatch.setattr(chat_server, "generate", spy)
    chat_server.select("b")
    requests = [("a", PROMPTS[0]), ("b", PROMPTS[1]), (None, PROMPTS[2]), ("a", PROMPTS[2])]
    answers = chat_server.ask_many(requests, max_new_tokens=5)
    assert answers == [expected["a"][0], expected["b"][1], expected["base"][2], expected["a"][2]]
    assert calls == [("b", 1), ("a", 2), (None, 1)]  # one batch per delta, the active one first


# ----------------------------------------------------------------- HTTP


def _http(url: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    data = None if body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_http_server_answers_generate_and_health(chat_server):
    httpd = build_http_server(chat_server, "127.0.0.1", 0, default_max_new_tokens=5, log=False)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        for name in ("a", "b"):
            status, reply = _http(
                f"{url}/generate", {"delta": name, "prompt": PROMPTS[0], "max_new_tokens": 4}
            )
            assert status == 200
            assert reply == {"delta": name, "output": chat_server.ask(PROMPTS[0], name, max_new_tokens=4)}
        assert _http(f"{url}/generate", {"prompt": PROMPTS[1]})[1]["delta"] == "base"
        status, health = _http(f"{url}/health")
        assert status == 200 and health["deltas"] == ["a", "b"]
        assert health["memory"] == chat_server.memory_report()
        status, reply = _http(f"{url}/generate", {"delta": "c", "prompt": "w1"})
        assert status == 404 and "known: base, a, b" in reply["error"]
        assert _http(f"{url}/generate", {"delta": "a", "prompt": ""})[0] == 400
        assert _http(f"{url}/generate", {"delta": "a", "prompt": "w1", "max_new_tokens": 0})[0] == 400
        assert _http(f"{url}/nowhere")[0] == 404
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)
    assert not thread.is_alive()


def test_server_binds_loopback_only():
    check_loopback("127.0.0.1")
    check_loopback("localhost")
    with pytest.raises(DeltaServingError, match="loopback"):
        check_loopback("0.0.0.0")
    with pytest.raises(DeltaServingError, match="loopback"):
        check_loopback("192.0.2.1")


# ----------------------------------------------------------------- CLI


def _cli(argv: list[str]) -> int:
    from flows.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code


def test_cli_ask_prints_each_delta_and_defaults_the_base_from_bitdelta_json(chat_server, untied, capsys):
    a, b = (f"{n}={d}" for n, d in untied["dirs"].items())
    argv = ["deltas", "ask", "--delta", a, "--delta", b, "--max-new-tokens", "4", PROMPTS[0]]
    assert _cli([*argv, "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines == [
        {"delta": n, "output": chat_server.ask(PROMPTS[0], n, max_new_tokens=4)} for n in ("a", "b")
    ]
    assert _cli([*argv, "--use", "b", "--base", str(untied["base_dir"])]) == 0
    assert capsys.readouterr().out == chat_server.ask(PROMPTS[0], "b", max_new_tokens=4) + "\n"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--delta", "oops"], "expected NAME=DIR"),
        (["--delta", "a=x", "--use", "c"], "--use c: unknown delta (known: base, a)"),
        (["--delta", "q={tmp}"], "is not a Bit-Delta output"),
    ],
)
def test_cli_bad_inputs_are_one_line_errors_with_exit_2(tied, tmp_path, capsys, extra, message):
    extra = [arg.replace("{tmp}", str(tmp_path)) for arg in extra]
    assert _cli(["deltas", "ask", "--base", str(tied["base_dir"]), *extra, "w1"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("posttrain deltas ask: error: "), err
    assert message in err


def test_cli_memory_and_help_read_like_a_manual(tied, capsys):
    assert _cli(["deltas", "memory", "--delta", f"a={tied['dirs']['a']}"]) == 0
    out = capsys.readouterr().out
    assert "delta a" in out and "as full models" in out
    assert _cli(["--help"]) == 0
    assert "posttrain deltas ask" in capsys.readouterr().out
    from flows.cli import build_parser

    assert "deltas" in build_parser().format_help()
    for command in ([], ["ask"], ["memory"], ["serve"]):
        assert _cli(["deltas", *command, "--help"]) == 0
        out = capsys.readouterr().out
        assert out.startswith(" ".join(["usage: posttrain deltas", *command])) and "examples:" in out
