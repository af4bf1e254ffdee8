"""Rewards, prompting baselines and the compare table: small pure pieces of the alignment issue."""

from __future__ import annotations

import pytest
import torch

from components.evaluation.prompting import COT_INSTRUCTION, final_line, prompt_for, shots_by_task
from components.training.grpo import informative_rows
from components.training.rewards import RewardFunction
from flows.compare import render, rows_from_exp_show


def test_verifier_reward_gives_partial_credit_and_the_trl_wrapper_reads_conversations() -> None:
    reward = RewardFunction("verifier")
    records = [{"prompt": "reverse abcd", "answer": "dcba"}] * 3
    assert reward(records, ["dcba", "dcbx", "zzzz"]) == [1.0, 0.5 * 3 / 4, 0.0]
    trl = reward.trl()
    assert trl.__name__ == "verifier_reward"
    got = trl(
        prompts=[[{"role": "user", "content": "reverse abcd"}]] * 2,
        completions=[[{"role": "assistant", "content": " dcba "}], [{"role": "assistant", "content": "x"}]],
        answer=["dcba", "dcba"],
    )
    assert got == [1.0, 0.0]


def test_without_partial_credit_the_verifier_pays_exact_answers_only() -> None:
    reward = RewardFunction("verifier", partial_credit=False)
    records = [{"prompt": "What is 27 + 82?", "answer": "109"}] * 3
    assert reward(records, ["109", " 109 ", "119"]) == [1.0, 1.0, 0.0]
    assert RewardFunction("verifier")(records[:1], ["119"]) == [0.5 * 2 / 3]  # the near miss's credit


def test_a_reward_needing_the_rm_refuses_to_start_without_it() -> None:
    with pytest.raises(ValueError, match="needs the reward model"):
        RewardFunction("rm")
    with pytest.raises(ValueError, match="unknown reward"):
        RewardFunction("judge")


def test_prompting_styles_build_the_conversations_they_claim() -> None:
    def example(question: str, answer: str, task: str) -> dict:
        turns = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return {"messages": turns, "task": task}

    train = [example(f"add {i} and 1", str(i + 1), "add") for i in range(5)] + [
        example("reverse ab", "ba", "reverse")
    ]
    shots = shots_by_task(train, k=2)
    assert shots == {"add": [("add 0 and 1", "1"), ("add 1 and 1", "2")], "reverse": [("reverse ab", "ba")]}
    record = {"prompt": "add 7 and 8", "answer": "15", "task": "add"}
    assert prompt_for("zero_shot", record, shots) == "add 7 and 8"
    assert prompt_for("cot", record, shots) == f"add 7 and 8\n{COT_INSTRUCTION}"
    few = prompt_for("few_shot", record, shots)
    assert [t["role"] for t in few] == ["user", "assistant", "user", "assistant", "user"]
    assert few[-1]["content"] == "add 7 and 8" and few[1]["content"] == "1"
    assert final_line("7 + 8: 7 + 8 = 15\n\n  15  \n") == "15"
    assert final_line("") == ""


def _exp(name: str, method: str, greedy: float, kl: float) -> dict:
    return {
        "rev": name * 4,
        "name": name,
        "data": {
            "params": {"params.yaml": {"data": {"align": {"method": method, "reward": "verifier"}}}},
            "metrics": {
                "metrics/align.json": {
                    "data": {"reward_mean_start": 0.6, "reward_mean_end": 0.7, "kl_to_ref": kl}
                },
                "metrics/evaluate.json": {
                    "data": {"aligned": {"accuracy": greedy}, "sft": {"accuracy": 0.5}}
                },
            },
        },
    }


def test_compare_rows_come_from_dvc_exp_show_one_per_distinct_result() -> None:
    show = [
        _exp("workspace", "grpo", 0.8, 0.1),
        {**_exp("main", "grpo", 0.8, 0.1), "experiments": [{"revs": [_exp("exp-ppo", "ppo", 0.7, 0.3)]}]},
        {"rev": "x", "name": "old", "data": {"params": {}, "metrics": {}}},  # no align metrics: skipped
    ]
    rows = rows_from_exp_show(show)
    assert [(r["experiment"], r["method"], r["greedy"], r["kl_to_ref"]) for r in rows] == [
        ("workspace", "grpo", 0.8, 0.1),
        ("exp-ppo", "ppo", 0.7, 0.3),
    ]
    table = render(rows, markdown=True).splitlines()
    assert table[0].startswith("| experiment | method | reward | greedy |")
    assert "| exp-ppo | ppo | verifier | 0.700 |" in table[3]


def _compress_exp(name: str, method: str, ratio: float, accuracy: float) -> dict:
    return {
        "rev": name * 4,
        "name": name,
        "data": {
            "params": {"params.yaml": {"data": {"compress": {"method": method}}}},
            "metrics": {
                "metrics/compress.json": {"data": {"compression_ratio": ratio, "fidelity_kl": 0.01}},
                "metrics/evaluate.json": {"data": {"compressed": {"accuracy": accuracy}}},
            },
        },
    }


def test_compare_compress_view_rows_and_its_size_against_accuracy_chart(tmp_path) -> None:
    from PIL import Image

    from flows.compare import chart

    show = [
        {
            **_compress_exp("main", "int8_weight", 3.4, 0.77),
            "experiments": [{"revs": [_compress_exp("exp-bd", "bitdelta", 15.0, 0.70)]}],
        },
        _exp("old", "grpo", 0.8, 0.1),  # an align-only result has no compress metrics: skipped
    ]
    rows = rows_from_exp_show(show, "compress")
    assert [(r["experiment"], r["method"], r["size_ratio"], r["candidate_greedy"]) for r in rows] == [
        ("main", "int8_weight", 3.4, 0.77),
        ("exp-bd", "bitdelta", 15.0, 0.70),
    ]
    table = render(rows, markdown=True, view="compress").splitlines()
    assert table[0].startswith("| experiment | method | size_ratio | fidelity_kl |")
    png = chart(rows, tmp_path / "c.png", "compress")
    with Image.open(png) as image:
        assert image.size[0] > 100 and len(set(image.convert("L").getdata())) > 2  # drawn, not blank


def _peft_exp(name: str, method: str, trainable: int, total: int, accuracy: float) -> dict:
    sft = {
        "peft_method": method,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_share": trainable / total,
        "peak_memory_bytes": 3 * 2**20,
        "adapter_bytes": 2048,
        "train_seconds": 12.5,
        "eval_accuracy": accuracy,
    }
    return {
        "name": name,
        "data": {
            "params": {"params.yaml": {"data": {"sft": {"peft": {"method": method}}}}},
            "metrics": {"metrics/sft.json": {"data": sft}},
        },
    }


def test_compare_peft_view_shows_each_method_in_readable_units(tmp_path) -> None:
    from flows.compare import chart

    show = [
        {
            **_peft_exp("main", "lora", 250, 1000, 0.5),
            "experiments": [{"revs": [_peft_exp("exp-bitfit", "bitfit", 10, 1000, 0.25)]}],
        },
        _exp("old", "grpo", 0.8, 0.1),  # no metrics/sft.json: skipped
    ]
    rows = rows_from_exp_show(show, "peft")
    assert [(r["method"], r["trainable_%"], r["peak_mb"], r["adapter_kb"], r["accuracy"]) for r in rows] == [
        ("lora", 25.0, 3.0, 2.0, 0.5),
        ("bitfit", 1.0, 3.0, 2.0, 0.25),
    ]
    table = render(rows, markdown=True, view="peft").splitlines()
    assert table[0].startswith("| experiment | method | trainable | trainable_% | peak_mb |")
    assert chart(rows, tmp_path / "p.png", "peft").stat().st_size > 1000


def test_informative_rows_drops_zero_advantage_completions_and_keeps_the_normaliser() -> None:
    batch = {
        "completion_ids": torch.tensor([[1, 2], [3, 4], [5, 6], [7, 8]]),
        "completion_mask": torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]]),
        "advantages": torch.tensor([0.0, 1.5, 0.0, -0.5]),
        "num_items_in_batch": torch.tensor(7),  # all four completions' tokens: the loss normaliser
    }
    out = informative_rows(batch)
    assert out["completion_ids"].tolist() == [[3, 4], [7, 8]]
    assert out["completion_mask"].tolist() == [[1, 0], [1, 1]]
    assert out["advantages"].tolist() == [1.5, -0.5]
    assert out["num_items_in_batch"].item() == 7
    assert batch["advantages"].tolist() == [0.0, 1.5, 0.0, -0.5], "the trainer's buffer is left intact"


def test_informative_rows_keeps_one_row_of_a_uniform_batch_and_everything_of_an_informative_one() -> None:
    uniform = {"advantages": torch.zeros(3), "completion_ids": torch.tensor([[1], [2], [3]])}
    assert informative_rows(uniform)["completion_ids"].tolist() == [[1]]
    informative = {"advantages": torch.tensor([0.5, -0.5]), "completion_ids": torch.tensor([[1], [2]])}
    assert informative_rows(informative) is informative
