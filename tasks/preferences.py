"""Stage ``preferences``: sample the SFT policy, grade, and write TRL preference pairs.

Writes ``train.jsonl`` and ``eval.jsonl`` (TRL conversational ``prompt``/``chosen``/``rejected``)
to ``paths.preferences``; user pairs imported by ``ingest`` are added to the training split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from components.artifacts import atomic_dir, describe_output
from components.config import to_dict
from components.data.jsonl import read_jsonl, write_jsonl
from components.data.preferences import build_pairs, split_pairs
from components.errors import DataError
from components.evaluation.generate import generate
from components.models.loading import load_tokenizer
from components.params import Params
from components.peft.adapters import load_policy
from components.tracking import Tracker
from tasks.stage import stage_command


def run(params: Params, tracker: Tracker) -> dict[str, Any]:
    cfg = params.preferences
    processed = Path(params.paths.processed)
    records = read_jsonl(processed / "preference_prompts.jsonl")[: cfg.max_prompts]
    model = load_policy(params.paths.sft_model, attached_ok=True)  # sampling works through any adapter
    tokenizer = load_tokenizer(params.paths.sft_model)
    samples = generate(
        model,
        tokenizer,
        [r["prompt"] for r in records],
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        num_return_sequences=cfg.k,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
    )
    pairs, stats = build_pairs(records, samples, cfg.reference_as_chosen)
    train, held_out = split_pairs(pairs, cfg.eval_fraction, cfg.seed)
    user_pairs_path = processed / "user_preferences.jsonl"
    user_pairs = read_jsonl(user_pairs_path) if user_pairs_path.exists() else []
    train += user_pairs
    if len(train) < 2 or not held_out:
        raise DataError(
            f"only {len(pairs)} preference pairs from {len(records)} prompts: raise preferences.k, "
            "preferences.temperature or preferences.max_prompts, or set preferences.reference_as_chosen"
        )
    with atomic_dir(params.paths.preferences) as tmp:
        write_jsonl(tmp / "train.jsonl", train)
        write_jsonl(tmp / "eval.jsonl", held_out)
        metrics = {**stats, "n_train": len(train), "n_eval": len(held_out), "n_user_pairs": len(user_pairs)}
        describe_output(
            tmp,
            stage="preferences",
            config=to_dict(cfg),
            seed=cfg.seed,
            metrics=metrics,
            inputs={"sft_model": params.paths.sft_model, "prompts": processed / "preference_prompts.jsonl"},
        )
    tracker.log_artifact(Path(params.paths.preferences) / "eval.jsonl", artifact_path="data")
    return metrics


main = stage_command("preferences", run)

if __name__ == "__main__":
    main()
