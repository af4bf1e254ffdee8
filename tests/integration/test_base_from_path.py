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
    _save_llama(dest, tok, tied=False)


def _save_llama(dest: Path, tok, tied: bool, **extra) -> None:  # noqa: ANN001 - a HF tokenizer
    """A random one-layer Llama over ``tok``'s vocabulary, saved with ``tok`` as a checkpoint."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
        pad_token_id=tok.pad_token_id,
        **extra,
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


def test_a_local_base_model_directory_is_a_dvc_dependency(tmp_path: Path) -> None:
    """``posttrain status`` adds the directory to dvc.yaml; editing a file there makes ``base`` stale."""
    import os
    import subprocess
    import sys

    from tests.conftest import make_repo

    bin_dir = str(Path(sys.executable).parent)  # dvc runs `python -m tasks.base`: this venv's python
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    def sh(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
        from tests.conftest import sh as checked

        return checked(cmd, cwd, env=env)

    repo = make_repo(tmp_path / "repo")
    original = (repo / "dvc.yaml").read_text()
    _save_tiny_model(repo / "checkpoints/mine", with_template=True)
    _use_model(repo, Path("checkpoints/mine"))
    dvc = [sys.executable, "-m", "dvc"]

    refused = subprocess.run([*dvc, "repro", "base"], cwd=repo, capture_output=True, text=True, env=env)
    assert refused.returncode != 0
    assert "base.model: checkpoints/mine is a local directory but not a dep of the base stage" in (
        refused.stdout + refused.stderr
    )

    status = sh([f"{bin_dir}/posttrain", "status"], repo)
    assert "dvc.yaml: base now depends on checkpoints/mine" in status.stdout
    assert "- checkpoints/mine  # base.model (kept in sync by posttrain)" in (repo / "dvc.yaml").read_text()
    sh([*dvc, "repro", "base"], repo)
    assert "base" not in sh([*dvc, "status", "base"], repo).stdout

    config = repo / "checkpoints/mine/config.json"
    config.write_text(config.read_text().replace('"hidden_size": 32', '"hidden_size": 32, "note": 1'))
    stale = sh([*dvc, "status", "base"], repo).stdout
    assert "changed deps" in stale and "checkpoints/mine" in stale

    _use_model(repo, Path("tiny"))
    removed = sh([f"{bin_dir}/posttrain", "status"], repo)
    assert "base no longer depends on checkpoints/mine" in removed.stdout
    assert (repo / "dvc.yaml").read_text() == original


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_sft_trains_the_rows_of_tokens_base_added(tiny_project: Path, tmp_path: Path, tied: bool) -> None:
    """A checkpoint without a chat template gains role tokens, and LoRA with no modules_to_save
    still trains their rows: untied, exactly those rows (PEFT trainable tokens; the adapter holds
    no full embedding); tied, the whole embedding, kept tied (TRL's fused LM head cannot read a
    trainable-tokens output layer: see components.peft.methods.library_config)."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from components.peft.adapters import load_policy
    from tasks import ingest, sft

    source = tmp_path / "third-party"  # a vocabulary without role tokens
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=280,
        special_tokens=[tiny.PAD, tiny.EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator([f"capital of land {i} is city {i}" for i in range(300)], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=tiny.EOS, pad_token=tiny.PAD)
    _save_llama(source, tok, tied, eos_token_id=tok.eos_token_id)
    n_vocab = len(tok)
    _use_model(tiny_project, source)
    params = yaml.safe_load((tiny_project / "params.yaml").read_text())
    params["sft"] |= {"epochs": 1, "learning_rate": 0.05}
    params["sft"]["peft"]["modules_to_save"] = []
    (tiny_project / "params.yaml").write_text(yaml.safe_dump(params))
    loaded = load_params("params.yaml")
    base.run(loaded, RecordingTracker())
    new = json.loads((tiny_project / "models/base/posttrain_new_tokens.json").read_text())["token_ids"]
    tok = load_tokenizer(tiny_project / "models/base")
    assert tok.convert_ids_to_tokens(new) == ["<|system|>", "<|user|>", "<|assistant|>"]
    assert new == [n_vocab, n_vocab + 1, n_vocab + 2]
    ingest.run(loaded, RecordingTracker())
    sft.run(loaded, RecordingTracker())

    adapter = load_file(str(tiny_project / "models/sft/adapter_model.safetensors"))
    full = [n for n, t in adapter.items() if t.shape[0] == len(tok)]
    assert bool(full) == tied, f"full embedding saved: {full}"
    assert any("trainable_tokens" in name for name in adapter) == (not tied)
    before = load_causal_lm(tiny_project / "models/base").get_input_embeddings().weight
    merged = load_policy(tiny_project / "models/sft")
    after = merged.get_input_embeddings().weight
    moved = (before - after).abs().sum(dim=1) > 0
    assert moved[new[1:]].all(), "a new token's row did not train"  # <|user|>, <|assistant|>
    if tied:
        assert merged.get_output_embeddings().weight is after, "the merge untied the embeddings"
    else:
        assert not moved[:n_vocab].any(), "a pretrained row moved"
        assert not moved[new[0]], "<|system|> never occurs in the data, so its row gets no gradient"
