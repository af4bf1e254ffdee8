"""Stage ``align``: preference optimisation of the SFT policy; ``align.method`` picks the algorithm."""

from __future__ import annotations

import shutil
from typing import Any

from components.artifacts import atomic_dir, describe_output
from components.config import to_dict
from components.data.jsonl import read_jsonl
from components.models.loading import require_dir
from components.params import Params
from components.tracking import Tracker
from components.training.callbacks import final_values, write_history_plots
from components.training.dpo import train_dpo
from tasks.stage import stage_command

# One module per algorithm; the alignment issue adds ppo/grpo/rloo here.
TRAINERS = {"dpo": train_dpo}


def run(params: Params, tracker: Tracker) -> dict[str, Any]:
    cfg = params.align
    policy = require_dir(params.paths.sft_model, "SFT model")
    prefs = require_dir(params.paths.preferences, "preference pairs")
    train, held_out = read_jsonl(prefs / "train.jsonl"), read_jsonl(prefs / "eval.jsonl")
    with atomic_dir(params.paths.aligned_model) as tmp:
        history = TRAINERS[cfg.method](
            cfg, policy, train, held_out, tmp, tracker, tmp / "_work", params.compute
        )
        shutil.rmtree(tmp / "_work", ignore_errors=True)
        keys = ("loss", "eval_loss", "eval_rewards/accuracies", "eval_rewards/margins")
        metrics: dict[str, Any] = {"method": cfg.method, "n_train": len(train), "n_eval": len(held_out)}
        metrics |= {k.replace("/", "_"): v for k, v in final_values(history, keys).items()}
        describe_output(
            tmp,
            stage="align",
            config=to_dict(cfg),
            seed=cfg.seed,
            metrics=metrics,
            inputs={"sft_model": policy, "preferences": prefs},
        )
    write_history_plots(params.paths.plots, "align", history, ["loss", "eval_loss"], tracker)
    if params.tracking.logs_model(params.paths.aligned_model):  # an adapter: the files are the model
        tracker.log_artifact(params.paths.aligned_model, artifact_path="model")
    return metrics


main = stage_command("align", run)

if __name__ == "__main__":
    main()
