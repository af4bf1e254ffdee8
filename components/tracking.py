"""The experiment-tracker protocol components log through.

Components never import mlflow: they receive a :class:`Tracker`. ``tasks.tracking``
provides the MLflow implementation; :class:`RecordingTracker` keeps everything in memory
for unit tests of the code around a tracker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None: ...

    def log_model(self, model_dir: Path | str, name: str, registered_name: str | None = None) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...


@dataclass
class RecordingTracker:
    """An in-memory tracker: records what was logged so a test can assert on it."""

    params: dict[str, Any] = field(default_factory=dict)
    metrics: list[tuple[str, float, int | None]] = field(default_factory=list)
    artifacts: list[tuple[str, str | None]] = field(default_factory=list)
    models: list[tuple[str, str, str | None]] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)

    def log_params(self, params: dict[str, Any]) -> None:
        self.params.update(params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.extend((k, float(v), step) for k, v in metrics.items())

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        self.artifacts.append((str(path), artifact_path))

    def log_model(self, model_dir: Path | str, name: str, registered_name: str | None = None) -> None:
        self.models.append((str(model_dir), name, registered_name))

    def set_tags(self, tags: dict[str, str]) -> None:
        self.tags.update(tags)

    def series(self, key: str) -> list[float]:
        """Every value logged under ``key``, in order."""
        return [v for k, v, _ in self.metrics if k == key]
