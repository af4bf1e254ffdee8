"""Stage ``evaluate``: one held-out suite on base, sft, aligned and the candidate (compressed).

Writes ``metrics/evaluate.json`` (``{"base": {...}, "sft": ..., "aligned": ..., "compressed": ...}``
plus ``reward_model_pairwise_accuracy``, ``kl_aligned_vs_sft``, the suite's fingerprint and the
candidate-vs-SFT half of the gate), ``plots/evaluate_accuracy.csv`` (+ ``.png``) and every greedy answer
(``paths.evaluation``/answers.json). The candidate is what would be deployed: the compressed
model, which is the merged model when ``compress.method: none``.

The champion half of the gate is not decided here: the champion lives in the MLflow registry,
outside the lineage, and a stage whose output depended on it could not be reproduced from
``dvc.lock``. ``tasks/promote.py`` reads this stage's output after every run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from components.artifacts import atomic_dir, describe_output
from components.charts import bar_chart
from components.compression.methods import load_compressed
from components.compression.quantize import mean_token_kl
from components.config import to_dict
from components.data.jsonl import read_jsonl
from components.evaluation.gate import promotion_decision, suite_fingerprint
from components.evaluation.prompting import prompting_baselines, shots_by_task
from components.evaluation.suite import answer_sequences, evaluate_policy
from components.models.loading import load_tokenizer, require_dir
from components.params import Params
from components.peft.adapters import load_policy
from components.tracking import Tracker
from components.training.reward_model import load_reward_model, pairwise_accuracy
from tasks.stage import stage_command

MODEL_DIRS = {
    "base": "base_model",
    "sft": "sft_model",
    "aligned": "aligned_model",
    "compressed": "compressed_model",
    "reward_model": "reward_model",
}
CANDIDATE = "compressed"
CHART_METRICS = ("accuracy", "lenient_accuracy", "sampled_accuracy", "reward_mean")


def run(params: Params, tracker: Tracker) -> dict[str, Any]:
    cfg, paths = params.evaluate, params.paths
    records = read_jsonl(Path(paths.processed) / "eval_prompts.jsonl")[: cfg.n_prompts]
    tokenizer = load_tokenizer(require_dir(paths.sft_model, "SFT model"))
    loaders = {
        "base": lambda: load_policy(paths.base_model),
        "sft": lambda: load_policy(paths.sft_model),
        "aligned": lambda: load_policy(paths.aligned_model),
        CANDIDATE: lambda: load_compressed(require_dir(paths.compressed_model, "compressed model")),
    }
    results: dict[str, Any] = {}
    answers: dict[str, list[dict[str, str]]] = {}
    models = {}
    for name, load in loaders.items():
        models[name] = load()
        results[name], answers[name] = evaluate_policy(models[name], tokenizer, records, cfg)
        tracker.log_metrics({f"{name}.{k}": v for k, v in results[name].items() if isinstance(v, float)})
    if cfg.prompting:  # the no-weight-change alternatives, on the models that have not been tuned for it
        shots = shots_by_task(read_jsonl(Path(paths.processed) / "sft_train.jsonl"), cfg.few_shot_k)
        results["prompting"] = {
            name: prompting_baselines(
                models[name],
                tokenizer,
                records,
                shots,
                cfg.prompting,
                max_new_tokens=cfg.max_new_tokens,
                cot_max_new_tokens=cfg.cot_max_new_tokens,
                batch_size=cfg.batch_size,
            )
            for name in ("base", "sft")
        }
    sequences = [ids for ids, _ in answer_sequences(tokenizer, records)]
    results["kl_aligned_vs_sft"] = mean_token_kl(models["aligned"], models["sft"], sequences)
    rm_dir = require_dir(paths.reward_model, "reward model")
    pairs = read_jsonl(Path(paths.preferences) / "eval.jsonl")
    results["reward_model_pairwise_accuracy"] = pairwise_accuracy(
        load_reward_model(rm_dir), load_tokenizer(rm_dir), pairs
    )
    passed, reason = promotion_decision(
        cfg.promotion_metric,
        results[CANDIDATE],
        results["sft"],
        None,
        cfg.promotion_max_accuracy_drop,
        aligned=results["aligned"],
        max_compression_drop=cfg.promotion_max_compression_drop,
    )
    results["candidate"] = CANDIDATE
    results["suite_sha256"] = suite_fingerprint(records, cfg)
    results["candidate_vs_sft"] = {"passed": passed, "reason": reason, "metric": cfg.promotion_metric}
    plots = Path(paths.plots) / "evaluate_accuracy.csv"
    plots.parent.mkdir(parents=True, exist_ok=True)
    rows = [",".join(["model", *CHART_METRICS])] + [
        ",".join([m, *(str(results[m][k]) for k in CHART_METRICS)]) for m in loaders
    ]
    plots.write_text("\n".join(rows) + "\n")
    chart = bar_chart(
        plots.with_suffix(".png"), {m: results[m] for m in loaders}, CHART_METRICS, "held-out suite by model"
    )
    tracker.log_artifact(chart, artifact_path="plots")
    with atomic_dir(paths.evaluation) as tmp:
        (tmp / "answers.json").write_text(json.dumps(answers, indent=1) + "\n")
        describe_output(
            tmp,
            stage="evaluate",
            config=to_dict(cfg),
            seed=cfg.seed,
            metrics=results,
            inputs={m: getattr(paths, d) for m, d in MODEL_DIRS.items()},
        )
    tracker.log_artifact(Path(paths.evaluation) / "answers.json", artifact_path="evaluation")
    tracker.set_tags({"posttrain.candidate_vs_sft": str(passed).lower()})
    print(json.dumps({m: round(results[m]["accuracy"], 3) for m in loaders}), f"candidate vs sft: {reason}")
    return results


main = stage_command("evaluate", run)

if __name__ == "__main__":
    main()
