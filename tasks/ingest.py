"""Stage ``ingest``: the shipped task data (or the user's JSONL), validated and split.

Writes to ``paths.processed``: ``sft_train.jsonl``, ``sft_eval.jsonl`` (chat ``messages``),
``preference_prompts.jsonl`` and ``eval_prompts.jsonl`` (``prompt``/``answer``/``task`` for the
verifier), and ``user_preferences.jsonl`` when ``ingest.preference_data`` is set.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

from components.artifacts import atomic_dir, describe_output
from components.config import ConfigError, to_dict
from components.data.jsonl import load_preference_file, load_sft_file, write_jsonl
from components.data.verifier import TASKS, Example, TaskWorld, sample_examples
from components.params import IngestConfig, Params
from components.tracking import Tracker
from tasks.stage import stage_command


def _prompt_record(ex: Example) -> dict[str, str]:
    return {"prompt": ex.prompt, "answer": ex.answer, "task": ex.task}


def build_splits(cfg: IngestConfig) -> dict[str, list[dict[str, Any]]]:
    """All ingest outputs, keyed by file stem. Held-out prompts never appear in training splits."""
    if not cfg.tasks:
        raise ConfigError(f"ingest.tasks: empty (choose from: {', '.join(TASKS)})")
    unknown = [t for t in cfg.tasks if t not in TASKS]
    if unknown:
        raise ConfigError(f"ingest.tasks: unknown task {unknown[0]!r} (known: {', '.join(TASKS)})")
    world, style = TaskWorld.load(cfg.facts), cfg.prompt_style
    eval_prompts = sample_examples(cfg.n_eval_prompts, cfg.tasks, world, seed=cfg.seed + 1, style=style)
    held_out = {ex.prompt for ex in eval_prompts}
    sft_eval = sample_examples(
        cfg.n_sft_eval, cfg.tasks, world, seed=cfg.seed + 2, exclude=held_out, style=style
    )
    held_out |= {ex.prompt for ex in sft_eval}
    pref_prompts = sample_examples(
        cfg.n_preference_prompts, cfg.tasks, world, seed=cfg.seed + 3, exclude=held_out, style=style
    )
    if cfg.sft_data:
        records = load_sft_file(cfg.sft_data)
        random.Random(cfg.seed).shuffle(records)
        n_eval = len(records) // 10  # 10% held out for eval loss; none for fewer than 10 records
        sft_train, sft_eval_records = records[n_eval:], records[:n_eval]
    else:
        train = sample_examples(
            cfg.n_sft_train, cfg.tasks, world, seed=cfg.seed + 4, exclude=held_out, style=style
        )
        sft_train = [{"messages": ex.messages(), "task": ex.task} for ex in train]
        sft_eval_records = [{"messages": ex.messages(), "task": ex.task} for ex in sft_eval]
    out = {
        "sft_train": sft_train,
        "sft_eval": sft_eval_records,
        "preference_prompts": [_prompt_record(ex) for ex in pref_prompts],
        "eval_prompts": [_prompt_record(ex) for ex in eval_prompts],
    }
    if cfg.preference_data:
        out["user_preferences"] = load_preference_file(cfg.preference_data)
    return out


def run(params: Params, tracker: Tracker) -> dict[str, Any]:
    cfg = params.ingest
    splits = build_splits(cfg)  # validates everything before anything is written
    with atomic_dir(params.paths.processed) as tmp:
        for name, records in splits.items():
            write_jsonl(tmp / f"{name}.jsonl", records)
        inputs = {"facts": cfg.facts, **({"sft_data": cfg.sft_data} if cfg.sft_data else {})}
        if cfg.preference_data:
            inputs["preference_data"] = cfg.preference_data
        metrics: dict[str, Any] = {f"n_{name}": len(records) for name, records in splits.items()}
        metrics["sft_train_tasks"] = dict(Counter(r["task"] for r in splits["sft_train"]))
        describe_output(
            tmp, stage="ingest", config=to_dict(cfg), inputs=inputs, seed=cfg.seed, metrics=metrics
        )
    tracker.log_artifact(Path(params.paths.processed) / "eval_prompts.jsonl", artifact_path="data")
    return metrics


main = stage_command("ingest", run)

if __name__ == "__main__":
    main()
