"""The champion/challenger gate: promote a candidate only when it is no worse than what it replaces.

The candidate is the model that would be deployed (the compressed model; the merged one when
compression is off). It must not score below SFT on the chosen metric (alignment and
compression exist to improve on SFT, not to trade it away) and must be within ``max_drop`` of
the current champion (so noise cannot ratchet quality down one small step at a time, while an
equal re-run can still take over). The first candidate has no champion to beat.

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
GATE_SETTINGS = ("promotion_alias", "promotion_max_accuracy_drop", "promotion_metric")


def promotion_decision(
    metric: str,
    candidate: Mapping[str, Any],
    sft: Mapping[str, Any],
    champion: Mapping[str, Any] | None,
    max_drop: float,
) -> tuple[bool, str]:
    """(promote?, a one-line reason naming the numbers) for ``candidate`` on ``metric``."""
    if metric not in GATE_METRICS:
        raise ValueError(f"unknown promotion metric {metric!r} (one of {', '.join(GATE_METRICS)})")
    c, s = float(candidate[metric]), float(sft[metric])
    if c < s:
        return False, f"candidate {metric} {c:.3f} is below sft {s:.3f}"
    if champion is None:
        return True, f"candidate {metric} {c:.3f} >= sft {s:.3f}; no champion yet"
    h = float(champion[metric])
    if c < h - max_drop:
        return False, f"candidate {metric} {c:.3f} is more than {max_drop} below the champion's {h:.3f}"
    return True, f"candidate {metric} {c:.3f} >= sft {s:.3f} and within {max_drop} of the champion's {h:.3f}"


def suite_fingerprint(records: Sequence[Mapping[str, Any]], cfg: EvaluateConfig) -> str:
    """sha256 of the held-out prompts and every scoring setting: equal fingerprints, comparable scores."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in GATE_SETTINGS}
    blob = json.dumps({"records": list(records), "settings": settings}, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()
