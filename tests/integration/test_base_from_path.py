"""``base.model`` as a local path: the real transformers loading code, on a tiny saved model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from components.artifacts import hash_path
from components.models import tiny
from components.models.loading import load_causal_lm, load_tokenizer
from components.params import load_params
from components.tracking import RecordingTracker
from tasks import base


def _save_tiny_model(dest: Path, with_template: bool) -> None:
    """A 'third-party' checkpoint: our tokenizer minus the role tokens/template, a random Llama."""
    lines = [f"word {i} plus {i} makes {2 * i}" for i in range(200)]
    tok = tiny.build_tokenizer(lines, 280)
    if not with_template:
        tok = type(tok)(tokenizer_object=tok.backend_tokenizer, eos_token=tiny.EOS, pad_token=tiny.PAD)
        tok.chat_template = None
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(str(dest), safe_serialization=True)
    tok.save_pretrained(str(dest))


def _use_model(project: Path, model: Path) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["base"]["model"] = str(model)
    (project / "params.yaml").write_text(yaml.safe_dump(params))


@pytest.mark.parametrize("with_template", [True, False])
def test_base_loads_a_local_checkpoint_and_keeps_its_weights(
    tiny_project: Path, tmp_path: Path, with_template: bool
) -> None:
    source = tmp_path / "third-party"
    _save_tiny_model(source, with_template)
    _use_model(tiny_project, source)
    metrics = base.run(load_params("params.yaml"), RecordingTracker())

    out = tiny_project / "models/base"
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    tok, model = load_tokenizer(out), load_causal_lm(out)
    original = load_causal_lm(source)
    assert tok.chat_template, "a tokenizer without a chat template gets ours"
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|assistant|>" in text
    assert metrics["vocab_size"] == len(tok) >= original.config.vocab_size
    ids = torch.tensor([[3, 4, 5, 6]])  # tokens that existed before any role token was added
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits[..., : original.config.vocab_size], original(ids).logits)


def test_a_local_base_model_directory_is_a_lineage_input(tiny_project: Path, tmp_path: Path) -> None:
    """The directory's content hash is in models/base/manifest.json: new files there, new output bytes."""
    source = tmp_path / "third-party"
    _save_tiny_model(source, with_template=True)
    _use_model(tiny_project, source)
    manifest = tiny_project / "models/base/manifest.json"
    base.run(load_params("params.yaml"), RecordingTracker())
    first = manifest.read_bytes()
    assert json.loads(first)["inputs"]["model"] == hash_path(source)

    (source / "NOTES.md").write_text("same weights, one more file\n")
    base.run(load_params("params.yaml"), RecordingTracker())
    assert json.loads(manifest.read_bytes())["inputs"]["model"] == hash_path(source)
    assert manifest.read_bytes() != first
