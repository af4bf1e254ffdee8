"""Stage ``base``: build (or load) the base model and save it with ``save_pretrained``."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from components.artifacts import atomic_dir, describe_output, hash_path
from components.config import ConfigError, to_dict
from components.errors import MissingInputError
from components.models.base_model import build_base, model_source
from components.models.loading import NEW_TOKENS_FILE, param_count, save_model
from components.models.local import missing_model_dep
from components.params import Params
from components.tracking import Tracker
from components.training.callbacks import write_history_plots
from components.training.pretrain import pretrain
from tasks.stage import DVC_STAGE_ENV, stage_command


def run(params: Params, tracker: Tracker) -> dict[str, Any]:
    cfg = params.base
    if os.environ.get(DVC_STAGE_ENV) and (problem := missing_model_dep(cfg.model)):  # lineage first
        raise ConfigError(problem)
    corpus: list[str] = []
    if cfg.model == "tiny":
        corpus_path = Path(cfg.corpus)
        if not corpus_path.is_file():
            raise MissingInputError(f"{corpus_path}: pretraining corpus not found (base.corpus)")
        corpus = [line for line in corpus_path.read_text().splitlines() if line.strip()]
    out = Path(params.paths.base_model)
    with atomic_dir(out) as tmp:
        model, tokenizer, new_tokens = build_base(cfg, corpus)
        history: list[dict[str, float]] = []
        if cfg.model == "tiny" and cfg.pretrain_epochs:
            history = pretrain(model, tokenizer, corpus, cfg, tracker, tmp / "_work", params.compute)
        save_model(model, tokenizer, tmp)
        if new_tokens:  # untrained embedding rows: sft trains exactly these (components.peft.adapters)
            (tmp / NEW_TOKENS_FILE).write_text(json.dumps({"token_ids": new_tokens}) + "\n")
        shutil.rmtree(tmp / "_work", ignore_errors=True)
        losses = [h["loss"] for h in history if "loss" in h]
        metrics = {"n_parameters": param_count(model), "vocab_size": len(tokenizer)}
        if new_tokens:
            metrics["n_new_tokens"] = len(new_tokens)
        if losses:
            metrics["pretrain_first_loss"], metrics["pretrain_final_loss"] = losses[0], losses[-1]
        inputs: dict[str, Path | str] = {"corpus": cfg.corpus}
        source = model_source(cfg.model)
        if source is not None:  # a local directory or the bundled GGUF: its content hash is lineage
            inputs["model"] = source
        describe_output(
            tmp,
            stage="base",
            config=to_dict(cfg),
            inputs=inputs,
            seed=cfg.seed,
            metrics=metrics,
        )
    write_history_plots(params.paths.plots, "base", history, ["loss"], tracker)
    if params.tracking.logs_model(out):  # full weights (only under `all`), once per content hash
        from tasks.tracking import log_model_once

        log_model_once(tracker, out, name="base", content_hash=hash_path(out))
    return metrics


main = stage_command("base", run)

if __name__ == "__main__":
    main()
