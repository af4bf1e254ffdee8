"""Resumable training: a killed ``sft``, ``reward_model`` or ``align`` stage resumes where it stopped.

A stage's outputs are written to a temporary directory and renamed at the end, so a kill loses
the run. Checkpoints therefore live outside it, under ``.posttrain/checkpoints/<stage>/<key>``,
where ``key`` hashes everything that determines the run: the stage's config, ``compute`` and
the content of its inputs. Re-running the stage with the same key resumes from the newest
checkpoint (Hugging Face ``Trainer``'s own: weights, optimizer, scheduler, RNG states and the
data position), so it ends at the weights an uninterrupted run reaches; any other key starts
afresh. A stage that finishes deletes its checkpoints. ``compute.checkpoint_steps: 0`` turns
checkpointing off.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from components.artifacts import hash_path

CHECKPOINT_ROOT = Path(".posttrain/checkpoints")


def checkpoint_dir(stage: str, config: Mapping[str, Any], inputs: Mapping[str, Path | str]) -> Path:
    """Where ``stage`` keeps checkpoints for exactly this config and these inputs."""
    fingerprint = {
        "stage": stage,
        "config": config,
        "inputs": {name: hash_path(path) for name, path in sorted(inputs.items())},
    }
    key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return CHECKPOINT_ROOT / stage / key


def last_checkpoint(work_dir: Path | str) -> str | None:
    """The newest complete ``checkpoint-<step>`` in ``work_dir``, if any.

    ``Trainer`` writes a checkpoint in place and its ``trainer_state.json`` last, after the
    weights, optimizer and RNG states; a directory without it was cut off by the kill and is
    ignored (with ``save_total_limit=1`` the previous, complete one is only deleted after).
    """
    work_dir = Path(work_dir)
    if not work_dir.is_dir():
        return None
    complete = [
        (int(match.group(1)), path)
        for path in work_dir.iterdir()
        if (match := re.fullmatch(r"checkpoint-(\d+)", path.name)) and (path / "trainer_state.json").is_file()
    ]
    return str(max(complete)[1]) if complete else None


def resume_or_train(trainer: Any) -> None:
    """``trainer.train()``, resuming from the newest checkpoint in its ``output_dir`` if one exists."""
    resume = last_checkpoint(trainer.args.output_dir)
    if resume:
        print(f"resuming from {resume}", flush=True)
    trainer.train(resume_from_checkpoint=resume)


def clear_checkpoints(stage: str) -> None:
    """Delete every checkpoint of ``stage`` (after it finished: none can be resumed any more)."""
    shutil.rmtree(CHECKPOINT_ROOT / stage, ignore_errors=True)
