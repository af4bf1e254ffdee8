"""The champion/challenger gate: promote a candidate only when it is no worse than what it replaces.

The candidate is the model that would be deployed (the compressed model; the merged one when
compression is off). Each step that made it is judged on its own job:

- alignment must not lose: the aligned (uncompressed) model may not score below SFT on the
  chosen metric, since alignment exists to improve on SFT, not to trade it away;
- compression may cost a bounded amount: the candidate must be within ``max_compression_drop``
  of the aligned model it was made from. Quantizing a real model flips a few answers either way
  (int8 per channel moves a 135M model's 120-prompt accuracy by about +-0.03, measured), so a
  gate that demanded the compressed model match SFT exactly would refuse or promote by coin flip;
- against the current champion it must be within ``max_drop`` (so noise cannot ratchet quality
  down one small step at a time, while an equal re-run can still take over). The first
  candidate has no champion to beat.

Pure functions: the registry I/O lives in ``tasks/promote.py``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from components.params import EvaluateConfig

GATE_METRICS = ("accuracy", "sampled_accuracy", "reward_mean")
# Settings that only decide what happens after scoring: they must not change the suite's identity.
GATE_SETTINGS = (
    "promotion_alias",
    "promotion_max_accuracy_drop",
    "promotion_max_compression_drop",
    "promotion_metric",
)
# Scores are means over a few hundred prompts: compare with a tolerance far below one answer.
EPS = 1e-9


def promotion_decision(
    metric: str,
    candidate: Mapping[str, Any],
    sft: Mapping[str, Any],
    champion: Mapping[str, Any] | None,
    max_drop: float,
    aligned: Mapping[str, Any] | None = None,
    max_compression_drop: float = 0.0,
) -> tuple[bool, str]:
    """(promote?, a one-line reason naming the numbers) for ``candidate`` on ``metric``.

    ``aligned`` is the uncompressed model the candidate was made from; ``None`` means the
    candidate *is* the aligned model (compression off), which then must not be below SFT itself.
    """
    if metric not in GATE_METRICS:
        raise ValueError(f"unknown promotion metric {metric!r} (one of {', '.join(GATE_METRICS)})")
    c, s = float(candidate[metric]), float(sft[metric])
    a, made = (c, "candidate") if aligned is None else (float(aligned[metric]), "aligned")
    if a < s - EPS:
        return False, f"{made} {metric} {a:.3f} is below sft {s:.3f}"
    verdict = f"{made} {metric} {a:.3f} >= sft {s:.3f}"
    if aligned is not None:
        if c < a - max_compression_drop - EPS:
            return False, (
                f"candidate {metric} {c:.3f} is more than {max_compression_drop} below "
                f"the aligned model's {a:.3f} (compression cost too much)"
            )
        verdict += f", candidate {c:.3f} within {max_compression_drop} of it"
    if champion is None:
        return True, f"{verdict}; no champion yet"
    h = float(champion[metric])
    if c < h - max_drop - EPS:
        return False, f"candidate {metric} {c:.3f} is more than {max_drop} below the champion's {h:.3f}"
    return True, f"{verdict}, and within {max_drop} of the champion's {h:.3f}"


def suite_fingerprint(records: Sequence[Mapping[str, Any]], cfg: EvaluateConfig) -> str:
    """sha256 of the held-out prompts and every scoring setting: equal fingerprints, comparable scores."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in GATE_SETTINGS}
    blob = json.dumps({"records": list(records), "settings": settings}, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()
