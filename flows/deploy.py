"""Schedules: serve the post-training flow as a Prefect deployment with a cron schedule.

``flow.serve`` registers the deployment with the Prefect API (the ephemeral one by default,
a Prefect server when ``PREFECT_API_URL`` is set) and runs scheduled flow runs from this
process. For Docker/Kubernetes work pools, build the same deployment with
:func:`build_deployment` and ``prefect deploy`` instead; the flow code does not change.
"""

from __future__ import annotations

from typing import Any

from flows.post_training import post_training


def build_deployment(cron: str, name: str = "posttrain-scheduled", repo_dir: str = ".") -> Any:
    """The deployment object (flow + cron schedule + parameters), without serving it."""
    return post_training.to_deployment(
        name=name,
        cron=cron,
        parameters={"repo_dir": repo_dir},
        description="Re-run the post-training DAG; DVC skips every stage whose inputs did not change.",
        tags=["posttrain"],
    )


def serve(cron: str, name: str = "posttrain-scheduled", repo_dir: str = ".") -> None:
    """Serve the flow on ``cron`` until interrupted."""
    post_training.serve(
        name=name,
        cron=cron,
        parameters={"repo_dir": repo_dir},
        description="Re-run the post-training DAG; DVC skips every stage whose inputs did not change.",
        tags=["posttrain"],
    )
