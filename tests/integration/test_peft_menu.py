"""The PEFT menu on the tiny model: each method trains exactly its own tensors, saves, and reloads.

One tiny project (base + ingest) is built per module; every method then runs the real SFT
training (TRL's ``SFTTrainer``) for a few steps with ``modules_to_save: []``, so the only
trainable tensors are the method's own. The spy on ``Trainer.train`` records every tensor
before and after; each test asserts which moved, that every frozen one is bit-identical, and
that the saved adapter reproduces the trained model (merged, for the methods that merge).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from components.params import PeftConfig, SFTConfig
from components.peft.adapters import AdapterBaseMismatch, NotMergeableError, load_policy
from components.peft.custom import PeftSetupError
from tests.conftest import make_project
from tests.integration.test_stages import TrainingRun, run_stage
from tests.integration.test_stages import trainer_runs as trainer_runs  # the spy fixture

pytestmark = pytest.mark.slow

BASE = Path("models/base")
PROMPT = "add 12 and 30"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory):
    root = make_project(tmp_path_factory.mktemp("peft") / "project")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        run_stage("base")
        run_stage("ingest")
        yield root


def sft_config(method: str, **peft_changes) -> SFTConfig:
    peft = dataclasses.replace(PeftConfig(), method=method, modules_to_save=(), **peft_changes)
    return SFTConfig(epochs=1, batch_size=8, learning_rate=1e-2, warmup_steps=0, peft=peft)


def train(cfg: SFTConfig, out: Path, n: int = 32, n_eval: int = 0):
    from components.data.jsonl import read_jsonl
    from components.tracking import RecordingTracker
    from components.training.sft import train_sft

    records = read_jsonl("data/processed/sft_train.jsonl")[:n]
    held_out = read_jsonl("data/processed/sft_eval.jsonl")[:n_eval]
    out.mkdir(parents=True)
    _, policy = train_sft(
        cfg, BASE, records, held_out, out, RecordingTracker(), out.parent / f"{out.name}-work"
    )
    return policy


def logits(model: torch.nn.Module) -> torch.Tensor:
    from components.evaluation.generate import chat_prompt_ids
    from components.models.loading import load_tokenizer

    ids = torch.tensor([chat_prompt_ids(load_tokenizer(BASE), [PROMPT])[0]])
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits[:, -ids.shape[1] :].float()


def base_logits() -> torch.Tensor:
    from components.models.loading import load_causal_lm

    return logits(load_causal_lm(BASE))


# Which tensors each method may train (names as the trainer sees them), and which merge.
OWN_TENSORS = {
    "lora": lambda n: ".lora_A." in n or ".lora_B." in n,
    "dora": lambda n: ".lora_A." in n or ".lora_B." in n or ".lora_magnitude_vector." in n,
    "qlora": lambda n: ".lora_A." in n or ".lora_B." in n,
    "ia3": lambda n: ".ia3_l." in n,
    "prompt": lambda n: n.startswith("prompt_encoder."),
    "prefix": lambda n: n.startswith("prompt_encoder."),
    "bitfit": lambda n: n.endswith(".bitfit_bias"),
    "adapter": lambda n: ".bottleneck_adapter." in n,
    "tinytl": lambda n: n.endswith(".bitfit_bias") or ".lite_residual." in n,
    "full": lambda n: True,
}
MERGEABLE = ("lora", "dora", "ia3", "bitfit", "full")


@pytest.mark.parametrize("method", list(OWN_TENSORS))
def test_each_method_trains_exactly_its_own_tensors(
    project: Path, method: str, trainer_runs: list[TrainingRun], tmp_path: Path
) -> None:
    out = tmp_path / method
    policy = train(sft_config(method), out)
    (run,) = trainer_runs
    run.check(OWN_TENSORS[method])  # each own tensor moved, every other one bit-identical
    if method in ("lora", "dora", "qlora"):
        b = [n for n in run.before if ".lora_B." in n]
        assert b and not any(run.before[n].any() for n in b), "LoRA's B starts at zero"
    if method in ("bitfit", "tinytl"):
        assert not any(run.before[n].any() for n in run.trainable if n.endswith(".bitfit_bias"))
    if method in ("adapter", "tinytl"):
        ups = [n for n in run.trainable if ".up." in n]
        assert ups and not any(run.before[n].any() for n in ups), "bottlenecks start as a no-op"

    attached = logits(policy.model)
    assert not torch.allclose(attached, base_logits(), atol=1e-4), (
        "training changed nothing the model outputs"
    )
    if method in MERGEABLE:
        merged = load_policy(out)
        assert type(merged).__name__ == "LlamaForCausalLM"
        torch.testing.assert_close(logits(merged), attached, atol=2e-5, rtol=1e-4)
    elif method != "qlora":
        with pytest.raises(NotMergeableError, match=rf"{method} adapter \(peft.method: {method}\)"):
            load_policy(out)
        torch.testing.assert_close(logits(load_policy(out, attached_ok=True)), attached, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "bitfit", "adapter", "tinytl"])
def test_methods_start_exactly_at_the_base_model(project: Path, method: str) -> None:
    from peft import get_peft_model

    from components.models.loading import load_causal_lm
    from components.peft.methods import prepare

    policy = prepare(load_causal_lm(BASE), sft_config(method).peft, "sft.peft")
    model = get_peft_model(policy.model, policy.peft_config) if policy.peft_config else policy.model
    torch.testing.assert_close(logits(model), base_logits(), atol=0, rtol=0)


def test_bitfit_merges_into_a_plain_llama_with_biases(project: Path, tmp_path: Path) -> None:
    from components.models.loading import load_causal_lm

    out = tmp_path / "bitfit"
    train(sft_config("bitfit"), out)
    merged = load_policy(out)
    assert merged.config.attention_bias and merged.config.mlp_bias
    merged.save_pretrained(tmp_path / "merged")
    reloaded = load_causal_lm(tmp_path / "merged")  # plain transformers, no hooks
    torch.testing.assert_close(logits(reloaded), logits(merged), atol=1e-6, rtol=0)


def test_qlora_base_is_4bit_and_merges_onto_the_full_precision_base(project: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    from components.models.loading import load_causal_lm

    out = tmp_path / "qlora"
    policy = train(sft_config("qlora"), out)
    assert policy.facts["quantized_weight_bytes_ratio"] <= 0.28  # NF4 + double quantization: ~0.258
    merged = load_policy(out)
    assert not any("Linear4bit" in type(m).__name__ for m in merged.modules()), "merged onto fp32 weights"
    unmerged = PeftModel.from_pretrained(load_causal_lm(BASE), str(out))
    torch.testing.assert_close(logits(merged), logits(unmerged), atol=2e-5, rtol=1e-4)


def test_qlora_adapter_keeps_learning_after_an_eval_pass(project: Path) -> None:
    """bitsandbytes' CPU repack after a no-grad eval forward would stop LoRA's gradients silently."""
    from peft import get_peft_model

    from components.peft.adapters import load_trainable

    policy = load_trainable(BASE, sft_config("qlora").peft, "sft.peft")
    model = get_peft_model(policy.model, policy.peft_config)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)  # the eval pass
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if ".lora_B." in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_unknown_target_module_names_the_key(project: Path, tmp_path: Path) -> None:
    peft = dataclasses.replace(PeftConfig().lora, target_modules=("q_proj", "qkv_proj"))
    with pytest.raises(
        PeftSetupError, match=r"^sft\.peft\.lora\.target_modules: no Linear layer named \['qkv_proj'\]"
    ):
        train(sft_config("lora", lora=peft), tmp_path / "x")
    with pytest.raises(PeftSetupError, match=r"^sft\.peft\.bitfit\.target_modules: no Linear layer named"):
        train(
            sft_config("bitfit", bitfit=dataclasses.replace(PeftConfig().bitfit, target_modules=("w1",))),
            tmp_path / "y",
        )


def test_qlora_without_bitsandbytes_is_one_clear_line(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails, as on a machine without it
    with pytest.raises(PeftSetupError, match=r"^sft\.peft\.method: qlora: .*bitsandbytes"):
        train(sft_config("qlora"), tmp_path / "q")


def test_an_adapter_over_another_base_fails_loudly(project: Path, tmp_path: Path) -> None:
    from components.models.loading import load_causal_lm, load_tokenizer

    out = tmp_path / "lora"
    train(sft_config("lora"), out)
    other = load_causal_lm(BASE)
    with torch.no_grad():
        other.model.norm.weight.mul_(1.5)  # same shapes, different weights
    other.save_pretrained(tmp_path / "other")
    load_tokenizer(BASE).save_pretrained(tmp_path / "other")
    with pytest.raises(AdapterBaseMismatch, match=r"trained over base weights .* but .*other holds"):
        load_policy(out, base=tmp_path / "other")
    load_policy(out, base=BASE)  # its own base still loads


# ------------------------------------------------------------------ many adapters on one base


@pytest.fixture(scope="module")
def two_task_adapters(project: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """LoRA adapters trained on different task subsets: "add" prompts and "reverse" prompts."""
    from components.data.jsonl import read_jsonl
    from components.tracking import RecordingTracker
    from components.training.sft import train_sft

    root = tmp_path_factory.mktemp("adapters")
    records = read_jsonl("data/processed/sft_train.jsonl")
    out = {}
    for task in ("add", "reverse"):
        subset = [r for r in records if r["messages"][0]["content"].startswith(task)][:32]
        out[task] = root / task
        out[task].mkdir()
        train_sft(sft_config("lora"), BASE, subset, [], out[task], RecordingTracker(), root / f"{task}-work")
    return out


def _task_prompts(task: str, n: int) -> list[str]:
    from components.data.jsonl import read_jsonl

    return [r["prompt"] for r in read_jsonl("data/processed/eval_prompts.jsonl") if r["task"] == task][:n]


def _held_out_prompts(task: str) -> list[str]:
    """Held-out prompts of ``task``: the eval prompts and the SFT-eval conversations' user turns."""
    from components.data.jsonl import read_jsonl

    chats = [r["messages"][0]["content"] for r in read_jsonl("data/processed/sft_eval.jsonl")]
    return _task_prompts(task, 1000) + [p for p in chats if p.startswith(task)]


def test_a_mixed_batch_gives_each_row_its_own_adapters_output(two_task_adapters: dict[str, Path]) -> None:
    from components.evaluation.generate import chat_prompt_ids, left_pad
    from components.peft.serving import AdapterServer

    server = AdapterServer(BASE, two_task_adapters)
    assert server.mixed  # LoRA adapters: one forward pass for the whole batch
    prompts = _task_prompts("add", 2) + _task_prompts("reverse", 2)
    names = ["add", "reverse", "reverse", None]  # rows deliberately crossed, and one bare base row
    ids, mask = left_pad(chat_prompt_ids(server.tokenizer, prompts), server.tokenizer.pad_token_id)
    with torch.no_grad():
        mixed = server.model(
            input_ids=ids, attention_mask=mask, adapter_names=[n or "__base__" for n in names]
        )
        for name in ("add", "reverse", None):
            if name is None:
                with server.model.disable_adapter():
                    alone = server.model(input_ids=ids, attention_mask=mask).logits
            else:
                server.model.set_adapter(name)
                alone = server.model(input_ids=ids, attention_mask=mask).logits
            for row in (i for i, n in enumerate(names) if n == name):
                torch.testing.assert_close(mixed.logits[row], alone[row], atol=1e-5, rtol=1e-5)
    # and the adapters differ, so the test above can tell them apart
    assert not torch.allclose(mixed.logits[1], mixed.logits[3], atol=1e-3)

    answers = server.ask_many(list(zip(names, prompts, strict=True)), max_new_tokens=6)
    assert [used for used, _ in answers] == ["add", "reverse", "reverse", "base"]
    for name in ("add", "reverse", None):
        alone = server.ask_many([(name, p) for p in prompts], max_new_tokens=6)
        for row in (i for i, n in enumerate(names) if n == name):
            assert answers[row][1] == alone[row][1]


def test_routing_sends_each_request_to_its_task_adapter(two_task_adapters: dict[str, Path]) -> None:
    from components.peft.serving import AdapterServer, UnknownAdapterError

    server = AdapterServer(BASE, two_task_adapters)
    from components.data.jsonl import read_jsonl

    train = [r["messages"][0]["content"] for r in read_jsonl("data/processed/sft_train.jsonl")]
    server.fit_router({task: [p for p in train if p.startswith(task)][:8] for task in two_task_adapters})
    held_out = [(p, task) for task in two_task_adapters for p in _held_out_prompts(task)]
    assert len(held_out) >= 6
    assert server.router_accuracy(held_out) >= 0.9  # always-one-adapter would score 0.5
    used = [
        u for u, _ in server.ask_many([(None, "add 3 and 4"), ("reverse", "add 3 and 4")], max_new_tokens=2)
    ]
    assert used == ["add", "reverse"]  # routed when unnamed; a named adapter is obeyed
    with pytest.raises(UnknownAdapterError, match=r"unknown adapter 'mul' \(known: base, add, reverse\)"):
        server.ask("add 3 and 4", "mul")


def test_prompt_tuned_tasks_share_one_batch(project: Path, tmp_path: Path) -> None:
    """Mixed-task batching: rows of different prompt-tuned tasks in one pass, each as its adapter alone."""
    from components.data.jsonl import read_jsonl
    from components.peft.serving import AdapterServer
    from components.tracking import RecordingTracker
    from components.training.sft import train_sft

    records = read_jsonl("data/processed/sft_train.jsonl")
    dirs = {}
    for task in ("add", "reverse"):
        subset = [r for r in records if r["messages"][0]["content"].startswith(task)][:32]
        dirs[task] = tmp_path / task
        dirs[task].mkdir()
        train_sft(
            sft_config("prompt"), BASE, subset, [], dirs[task], RecordingTracker(), tmp_path / f"{task}-w"
        )
    server = AdapterServer(BASE, dirs)
    assert server.prompt_tuned and server.mixed
    prompts = _task_prompts("add", 2) + _task_prompts("reverse", 2)
    names = ["add", "reverse", "add", None]
    mixed = server.ask_many(list(zip(names, prompts, strict=True)), max_new_tokens=6)
    server.prompt_tuned = server.mixed = False  # PEFT's own generate, one adapter group at a time
    for name in ("add", "reverse", None):
        rows = [i for i, n in enumerate(names) if n == name]
        alone = server.ask_many([(name, prompts[i]) for i in rows], max_new_tokens=6)
        assert [mixed[i] for i in rows] == alone, name


def test_adapters_cli_answers_with_the_named_or_routed_adapter(
    two_task_adapters: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from flows.cli import main

    examples = {}
    for task in two_task_adapters:
        examples[task] = tmp_path / f"{task}.jsonl"
        examples[task].write_text("".join(json.dumps({"prompt": p}) + "\n" for p in _task_prompts(task, 4)))
    common = ["--base", str(BASE)] + [f"--adapter={t}={d}" for t, d in two_task_adapters.items()]
    with pytest.raises(SystemExit) as exit_info:
        main(["adapters", "ask", *common, "--use", "add", "--use", "base", "--json", "add 2 and 3"])
    assert exit_info.value.code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["adapter"] for line in lines] == ["add", "base"]
    routing = [f"--examples={t}={f}" for t, f in examples.items()]
    with pytest.raises(SystemExit):
        main(["adapters", "ask", *common, *routing, "--json", "reverse abcd"])
    assert json.loads(capsys.readouterr().out)["adapter"] == "reverse"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "add 1 and 2"}\n{"text": 3}\n')
    with pytest.raises(SystemExit) as exit_info:
        main(["adapters", "ask", *common, f"--examples=add={bad}", "hi"])
    assert exit_info.value.code == 2
    assert f"{bad}:2: expected a 'prompt' string" in capsys.readouterr().err
