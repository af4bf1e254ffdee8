"""Stage ``align``: optimise the SFT policy; ``align.method`` picks the algorithm.

- ``dpo``: TRL ``DPOTrainer`` on the preference pairs (offline: learns from the pairs it is shown);
- ``grpo`` / ``rloo``: TRL's group-baseline online RL on the preference prompts;
- ``ppo``: our PPO (components/training/ppo.py) with a value head and the adaptive KL controller.

The online methods maximise ``align.reward`` (verifier, the reward model, or both). Every method
trains a fresh LoRA adapter over the SFT model, so the SFT policy is the adapter-disabled
network, which is both the KL reference and the "start" of ``metrics/align.json``'s held-out
report (:mod:`components.training.report`). Its inputs are the union of what the methods read
(``dvc.yaml``): the SFT model, the pairs, the prompts and the reward model; a method's own
sub-section (``align.grpo.*``) re-runs only this stage and its descendants.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from transformers import set_seed

from components.artifacts import atomic_dir, describe_output
from components.config import to_dict
from components.data.jsonl import read_jsonl
from components.distributed import resolve_compute
from components.errors import DataError
from components.evaluation.generate import chat_prompt_ids
from components.models.loading import load_tokenizer, require_dir
from components.params import Params
from components.peft.adapters import load_policy, load_trainable, save_policy
from components.peft.methods import TrainablePolicy
from components.tracking import Tracker
from components.training.callbacks import final_values, write_history_plots
from components.training.checkpoints import checkpoint_dir, clear_checkpoints
from components.training.cost import peft_report
from components.training.dpo import train_dpo
from components.training.grpo import train_group_rl
from components.training.ppo import train_ppo
from components.training.report import held_out_report
from components.training.rewards import RewardFunction
from tasks.stage import stage_command

# plots/align_<curve>.csv for every method (dvc.yaml declares them all): a curve a method does
# not log (eval_loss for the online methods, reward and kl for DPO) is a header-only file.
CURVES = ["loss", "eval_loss", "reward", "kl"]
SUMMARY_KEYS = (
    "loss",
    "eval_loss",
    "eval_rewards/accuracies",
    "eval_rewards/margins",
    "reward",
    "kl",
    "entropy",
    "clipfrac",
    "explained_variance",
    "kl_coef",
    "round_n_pairs",  # on-policy DPO rounds: the last re-sampling's pairs, ties and judge agreement
    "round_n_ties",
    "round_agreement",
)
RENAMED = {"reward": "train_reward", "kl": "train_kl"}  # "reward" names align.reward in the metrics


def report_prompts(processed: Path, n: int) -> list[dict[str, str]]:
    """The held-out report set: SFT-eval prompts that no alignment method trains on."""
    trained = {r["prompt"] for r in read_jsonl(processed / "preference_prompts.jsonl")}
    records = []
    for rec in read_jsonl(processed / "sft_eval.jsonl"):
        user, answer = rec["messages"][-2], rec["messages"][-1]
        if user["content"] not in trained:
            records.append(
                {"prompt": user["content"], "answer": answer["content"], "task": rec.get("task", "")}
            )
    return records[:n]


def run(params: Params, tracker: Tracker) -> dict[str, Any]:
    cfg = params.align
    policy = require_dir(params.paths.sft_model, "SFT model")
    processed = require_dir(params.paths.processed, "processed data")
    tokenizer = load_tokenizer(policy)
    judged_rounds = cfg.method == "dpo" and cfg.dpo.round_judge != "verifier"
    rm_dir = params.paths.reward_model if cfg.reward != "verifier" or judged_rounds else None
    reward = RewardFunction(cfg.reward, rm_dir, cfg.rm_weight, cfg.partial_credit)
    judge = (
        RewardFunction(cfg.dpo.round_judge, rm_dir, cfg.rm_weight, cfg.partial_credit)
        if judged_rounds
        else None
    )
    held_out = report_prompts(processed, cfg.n_report_prompts)
    if not held_out:
        raise DataError(f"{processed / 'sft_eval.jsonl'}: no held-out prompts for align's report")
    metrics: dict[str, Any] = {"method": cfg.method, "reward": cfg.reward}
    inputs: dict[str, Path | str] = {"sft_model": policy}

    checkpoint_inputs = {"sft_model": policy, "data": processed}
    if cfg.method == "dpo":
        checkpoint_inputs["preferences"] = params.paths.preferences
    if rm_dir:
        checkpoint_inputs["reward_model"] = rm_dir
    work = checkpoint_dir(
        "align", {"align": to_dict(cfg), "compute": to_dict(params.compute)}, checkpoint_inputs
    )
    with atomic_dir(params.paths.aligned_model) as tmp:
        started = time.perf_counter()
        if cfg.method == "dpo":
            prefs = require_dir(params.paths.preferences, "preference pairs")
            train, eval_pairs = read_jsonl(prefs / "train.jsonl"), read_jsonl(prefs / "eval.jsonl")
            model, history = train_dpo(
                cfg, policy, tokenizer, train, eval_pairs, tracker, work, params.compute,
                prompts=read_jsonl(processed / "preference_prompts.jsonl"), judge=judge,
            )  # fmt: skip
            metrics |= {"n_train": len(train), "n_eval": len(eval_pairs)}
            inputs["preferences"] = prefs
            if judge is not None:
                inputs["reward_model"] = params.paths.reward_model
        else:
            prompts = read_jsonl(processed / "preference_prompts.jsonl")
            if not prompts:
                raise DataError(
                    f"{processed / 'preference_prompts.jsonl'}: no prompts to train {cfg.method} on"
                )
            inputs["prompts"] = processed / "preference_prompts.jsonl"
            if rm_dir:
                inputs["reward_model"] = rm_dir
            metrics["n_train"] = len(prompts)
            if cfg.method == "ppo":
                device, _ = resolve_compute(params.compute)  # PPO trains in fp32 on that device
                set_seed(cfg.seed)
                trainable = load_trainable(
                    policy, cfg.peft, "align.peft", compute=params.compute, seed=cfg.seed
                )
                model, history = train_ppo(
                    trainable.model if cfg.peft.method == "qlora" else trainable.model.to(device),
                    tokenizer,
                    prompts,
                    chat_prompt_ids(tokenizer, [r["prompt"] for r in prompts]),
                    reward,
                    cfg.ppo,
                    trainable.peft_config,
                    seed=cfg.seed,
                    log=lambda row, step: tracker.log_metrics(
                        {f"align/{k}": v for k, v in row.items()}, step=step
                    ),
                    work_dir=work,
                    checkpoint_steps=params.compute.checkpoint_steps,
                )
            else:
                settings = cfg.grpo if cfg.method == "grpo" else cfg.rloo
                model, history = train_group_rl(
                    cfg.method, settings, cfg.peft, cfg.seed, policy, tokenizer, prompts, reward, tracker,
                    work, params.compute,
                )  # fmt: skip
        # measured, not reproducible: in metrics/align.json (posttrain compare), not in the output
        seconds = time.perf_counter() - started
        save_policy(model, tokenizer, tmp, policy)
        cost = peft_report(TrainablePolicy(model, None, cfg.peft.method, "align.peft"), tmp, seconds)
        cost["peak_memory_mb"] = cost["peak_memory_bytes"] / 2**20
        metrics["peft_method"] = cost.pop("peft_method")
        # a full fine-tune has no adapter to disable: the report's start is the SFT policy itself
        reference = load_policy(policy).to(model.device) if cfg.peft.method == "full" else None
        metrics |= held_out_report(model, tokenizer, held_out, reward, seed=cfg.seed, reference=reference)
        metrics["eval_accuracy"] = metrics["accuracy_end"]  # the key every training stage reports
        last = final_values(history, SUMMARY_KEYS)  # the last logged training values
        metrics |= {RENAMED.get(k, k.replace("/", "_")): v for k, v in last.items()}
        describe_output(
            tmp, stage="align", config=to_dict(cfg), seed=cfg.seed, metrics=metrics, inputs=inputs
        )
        metrics |= cost
    write_history_plots(params.paths.plots, "align", history, CURVES, tracker)
    if params.tracking.logs_model(params.paths.aligned_model):  # an adapter: the files are the model
        tracker.log_artifact(params.paths.aligned_model, artifact_path="model")
    clear_checkpoints("align")  # finished: nothing left to resume
    return metrics


main = stage_command("align", run)

if __name__ == "__main__":
    main()
