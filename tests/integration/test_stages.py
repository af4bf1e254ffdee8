"""Each training stage on the tiny config, in DAG order, with real TRL/PEFT training.

One module-scoped project is threaded through the stages (each test needs its upstream
outputs); every test asserts the stage actually did its job, not merely that it ran.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from components.params import load_params
from components.tracking import RecordingTracker
from tests.conftest import make_project

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory):
    root = make_project(tmp_path_factory.mktemp("stages") / "project")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        yield root


def run_stage(name: str) -> tuple[dict, RecordingTracker]:
    import importlib

    module = importlib.import_module(f"tasks.{name}")
    tracker = RecordingTracker()
    return module.run(load_params("params.yaml"), tracker), tracker


def no_temp_dirs(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".tmp-" in p.name]


def test_base_builds_a_pretrained_tiny_llama(project: Path) -> None:
    metrics, tracker = run_stage("base")
    out = project / "models/base"
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    assert {"config.yaml", "manifest.json", "metrics.json", "tokenizer.json"} <= {
        p.name for p in out.iterdir()
    }
    assert metrics["pretrain_final_loss"] < metrics["pretrain_first_loss"]
    assert tracker.series("pretrain/loss"), "pretraining loss was not logged with steps"
    from components.models.loading import load_causal_lm, load_tokenizer

    tok, model = load_tokenizer(out), load_causal_lm(out)
    assert model.config.model_type == "llama"
    text = tok.apply_chat_template(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], tokenize=False
    )
    assert "<|assistant|>a<|end|>" in text
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    marked = [t for t, m in zip(enc["input_ids"], enc["assistant_masks"], strict=True) if m]
    assert tok.decode(marked) == "a<|end|>", "assistant-only loss needs exactly the answer marked"
    assert no_temp_dirs(project / "models")


def test_base_is_deterministic(project: Path, tmp_path: Path) -> None:
    first = load_file(str(project / "models/base/model.safetensors"))
    from components.models.base_model import build_base

    cfg = load_params("params.yaml").base
    corpus = [x for x in Path(cfg.corpus).read_text().splitlines() if x]
    from components.training.pretrain import pretrain

    model, tokenizer = build_base(cfg, corpus)
    pretrain(model, tokenizer, corpus, cfg, RecordingTracker(), tmp_path / "work")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, first[name]), name


def test_ingest_writes_disjoint_splits(project: Path) -> None:
    metrics, _ = run_stage("ingest")
    processed = project / "data/processed"
    train = [json.loads(x) for x in (processed / "sft_train.jsonl").read_text().splitlines()]
    evals = [json.loads(x) for x in (processed / "eval_prompts.jsonl").read_text().splitlines()]
    assert metrics["n_sft_train"] == len(train) == 160
    held_out = {e["prompt"] for e in evals if e["task"] != "capital"}
    assert not held_out & {r["messages"][0]["content"] for r in train}


def test_sft_trains_a_lora_adapter_that_changes_the_model(project: Path) -> None:
    metrics, tracker = run_stage("sft")
    out = project / "models/sft"
    adapter = load_file(str(out / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b), "LoRA B starts at zero: training must move it"
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "models/base"
    assert adapter_config["target_modules"] == sorted(adapter_config["target_modules"]), "bytes must not vary"
    assert metrics["final_loss"] < metrics["first_loss"]
    assert (project / "plots/sft_loss.csv").read_text().startswith("step,loss")
    from components.evaluation.generate import chat_prompt_ids
    from components.models.loading import load_causal_lm, load_tokenizer
    from components.peft.adapters import load_policy

    ids = torch.tensor([chat_prompt_ids(load_tokenizer(out), ["add 12 and 30"])[0]])
    with torch.no_grad():
        assert not torch.allclose(
            load_policy(out)(ids).logits, load_causal_lm(project / "models/base")(ids).logits
        )


def test_preferences_are_graded_pairs_in_trl_format(project: Path) -> None:
    metrics, _ = run_stage("preferences")
    from components.data.verifier import verify

    pairs = [json.loads(x) for x in (project / "data/preferences/train.jsonl").read_text().splitlines()]
    prompts = {
        r["prompt"]: r["answer"]
        for r in map(
            json.loads, (project / "data/processed/preference_prompts.jsonl").read_text().splitlines()
        )
    }
    assert metrics["n_pairs"] == len(pairs) + metrics["n_eval"] > 0
    for pair in pairs:
        answer = prompts[pair["prompt"][0]["content"]]
        assert verify(pair["chosen"][0]["content"], answer)
        assert not verify(pair["rejected"][0]["content"], answer)
    assert metrics["n_pairs"] == metrics["n_pairs_sampled"] + metrics["n_pairs_reference"]


def test_reward_model_learns_to_rank_pairs(project: Path) -> None:
    metrics, tracker = run_stage("reward_model")
    assert (project / "models/reward_model/model.safetensors").is_file()
    assert tracker.series("reward_model/loss")
    # One epoch on a few dozen pairs: the RM must at least rank its own training pairs better than chance.
    assert metrics["train_pairwise_accuracy"] > 0.5


def test_reward_model_training_is_reproducible(project: Path, tmp_path: Path) -> None:
    """Same data and seed give the same weights, reward head included (seeded before it is built)."""
    from components.training.reward_model import train_reward_model

    params = load_params("params.yaml")
    prefs = project / "data/preferences"
    train = [json.loads(x) for x in (prefs / "train.jsonl").read_text().splitlines()]
    held_out = [json.loads(x) for x in (prefs / "eval.jsonl").read_text().splitlines()]
    out = tmp_path / "rm"
    out.mkdir()
    train_reward_model(
        params.reward_model, project / "models/sft", train, held_out, out, RecordingTracker(), tmp_path / "w"
    )
    first = load_file(str(project / "models/reward_model/model.safetensors"))
    again = load_file(str(out / "model.safetensors"))
    assert first.keys() == again.keys()
    for name in first:
        assert torch.equal(first[name], again[name]), name


def test_align_dpo_moves_the_policy_off_sft(project: Path) -> None:
    metrics, tracker = run_stage("align")
    out = project / "models/aligned"
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "models/sft"
    assert metrics["method"] == "dpo"
    assert tracker.series("align/loss")
    from components.compression.quantize import mean_token_kl
    from components.evaluation.suite import answer_sequences
    from components.models.loading import load_tokenizer
    from components.peft.adapters import load_policy

    records = [
        json.loads(x) for x in (project / "data/processed/eval_prompts.jsonl").read_text().splitlines()
    ]
    seqs = [ids for ids, _ in answer_sequences(load_tokenizer(out), records[:4])]
    assert mean_token_kl(load_policy(out), load_policy(project / "models/sft"), seqs) > 0


def test_compress_merges_exactly_and_quantizes_smaller(project: Path) -> None:
    metrics, _ = run_stage("compress")
    out = project / "models/compressed"
    from peft import PeftModel

    from components.models.loading import load_causal_lm
    from components.peft.adapters import load_policy

    # The merged full-precision weights give the same logits as the unmerged adapter over its base.
    unmerged = PeftModel.from_pretrained(load_policy(project / "models/sft"), str(project / "models/aligned"))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        torch.testing.assert_close(
            load_causal_lm(out / "merged")(ids).logits, unmerged(ids).logits, atol=1e-5, rtol=1e-5
        )
    assert metrics["size_bytes_compressed"] < metrics["size_bytes_full"]
    assert metrics["compression_ratio"] == pytest.approx(
        metrics["size_bytes_full"] / metrics["size_bytes_compressed"]
    )
    assert 0 < metrics["fidelity_kl"] < 0.1


def test_evaluate_scores_every_model_on_one_suite(project: Path) -> None:
    results, _ = run_stage("evaluate")
    for model in ("base", "sft", "aligned", "compressed"):
        assert set(results[model]) >= {"accuracy", "reward_mean", "perplexity"}
        assert 0 <= results[model]["accuracy"] <= 1
    assert results["sft"]["perplexity"] < results["base"]["perplexity"], "SFT must fit the answer format"
    assert 0 <= results["reward_model_pairwise_accuracy"] <= 1
    assert results["kl_aligned_vs_sft"] > 0
    assert isinstance(results["promoted"], bool) and results["promotion_reason"]
    answers = json.loads((project / "data/evaluation/answers.json").read_text())
    assert len(answers["sft"]) == 16
