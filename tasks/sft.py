"""Stage ``sft``: TRL ``SFTTrainer`` on the ingested chat data (LoRA adapter over the base by default)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from components.artifacts import atomic_dir, describe_output
from components.config import to_dict
from components.data.jsonl import read_jsonl
from components.models.loading import load_tokenizer, require_dir
from components.params import Params
from components.tracking import Tracker
from components.training.callbacks import final_values, write_history_plots
from components.training.checkpoints import checkpoint_dir, clear_checkpoints
from components.training.cost import Stopwatch, greedy_scores, peft_report
from components.training.sft import train_sft
from tasks.stage import stage_command


def run(params: Params, tracker: Tracker) -> dict[str, Any]:
    cfg = params.sft
    base = require_dir(params.paths.base_model, "base model")
    processed = Path(params.paths.processed)
    train, held_out = read_jsonl(processed / "sft_train.jsonl"), read_jsonl(processed / "sft_eval.jsonl")
    with atomic_dir(params.paths.sft_model) as tmp:
        work = checkpoint_dir(
            "sft",
            {"sft": to_dict(cfg), "compute": to_dict(params.compute)},
            {"base": base, "data": processed},
        )
        with Stopwatch() as watch:
            history, policy = train_sft(
                cfg, base, train, held_out, tmp, tracker, work, params.compute, model_name=params.base.model
            )
        losses = [h["loss"] for h in history if "loss" in h]
        metrics: dict[str, Any] = {"n_train": len(train), "n_eval": len(held_out)}
        if losses:
            metrics |= {"first_loss": losses[0], "final_loss": losses[-1]}
        metrics |= {k: v for k, v in final_values(history, ("eval_loss",)).items()}
        # the trained model as it stands (adapter attached): greedy answers to held-out prompts
        prompts = read_jsonl(processed / "eval_prompts.jsonl")[: cfg.n_eval_prompts]
        metrics |= greedy_scores(policy.model, load_tokenizer(tmp), prompts, cfg.eval_max_new_tokens)
        cost = peft_report(policy, tmp, watch.seconds)  # measured, not reproducible: not in the output
        metrics = {"peft_method": cost.pop("peft_method"), **metrics}
        describe_output(
            tmp,
            stage="sft",
            config=to_dict(cfg),
            seed=cfg.seed,
            metrics=metrics,
            inputs={"base_model": base, "train": processed / "sft_train.jsonl"},
        )
        metrics |= cost
    write_history_plots(params.paths.plots, "sft", history, ["loss", "eval_loss"], tracker)
    if params.tracking.logs_model(params.paths.sft_model):  # an adapter: the files are the model
        tracker.log_artifact(params.paths.sft_model, artifact_path="model")
    clear_checkpoints("sft")  # finished: nothing left to resume
    return metrics


main = stage_command("sft", run)

if __name__ == "__main__":
    main()
