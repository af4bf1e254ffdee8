"""Stage ``reward_model``: Bradley-Terry RM from the SFT weights; held-out pairwise accuracy."""

from __future__ import annotations

from typing import Any

from components.artifacts import atomic_dir, describe_output
from components.config import to_dict
from components.data.jsonl import read_jsonl
from components.distributed import is_main_process
from components.models.loading import load_tokenizer, require_dir
from components.params import Params
from components.tracking import Tracker
from components.training.callbacks import write_history_plots
from components.training.checkpoints import checkpoint_dir, clear_checkpoints
from components.training.cost import Stopwatch, peft_report
from components.training.reward_model import load_reward_model, pairwise_accuracy, train_reward_model
from tasks.stage import stage_command


def run(params: Params, tracker: Tracker) -> dict[str, Any]:
    cfg = params.reward_model
    policy = require_dir(params.paths.sft_model, "SFT model")
    prefs = require_dir(params.paths.preferences, "preference pairs")
    train, held_out = read_jsonl(prefs / "train.jsonl"), read_jsonl(prefs / "eval.jsonl")
    with atomic_dir(params.paths.reward_model) as tmp:
        work = checkpoint_dir(
            "reward_model",
            {"reward_model": to_dict(cfg), "compute": to_dict(params.compute)},
            {"sft_model": policy, "preferences": prefs},
        )
        with Stopwatch() as watch:
            history, trained = train_reward_model(
                cfg, policy, train, held_out, tmp, tracker, work, params.compute
            )
        cost = peft_report(trained, tmp, watch.seconds)  # measured, not reproducible: not in the output
        # A DDP worker's part ends with training: transformers saves weights on rank 0 only.
        if not is_main_process():
            return {}
        model, tokenizer = load_reward_model(tmp), load_tokenizer(tmp)
        accuracy = pairwise_accuracy(model, tokenizer, held_out)
        metrics: dict[str, Any] = {
            "peft_method": cost.pop("peft_method"),
            "pairwise_accuracy": accuracy,
            "eval_accuracy": accuracy,  # the key every training stage reports (here: held-out pairs)
            "train_pairwise_accuracy": pairwise_accuracy(model, tokenizer, train[:500]),
            "n_train": len(train),
            "n_eval": len(held_out),
        }
        describe_output(
            tmp,
            stage="reward_model",
            config=to_dict(cfg),
            seed=cfg.seed,
            metrics=metrics,
            inputs={"sft_model": policy, "preferences": prefs},
        )
        metrics |= cost
    write_history_plots(params.paths.plots, "reward_model", history, ["loss", "eval_loss"], tracker)
    if params.tracking.logs_model(params.paths.reward_model):  # an adapter: the files are the model
        tracker.log_artifact(params.paths.reward_model, artifact_path="model")
    clear_checkpoints("reward_model")  # finished: nothing left to resume
    return metrics


main = stage_command("reward_model", run)

if __name__ == "__main__":
    main()
