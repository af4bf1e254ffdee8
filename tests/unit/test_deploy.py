"""The scheduled deployment is a real Prefect deployment of the post-training flow."""

from __future__ import annotations

from flows.deploy import build_deployment
from flows.post_training import post_training


def test_deployment_carries_the_cron_schedule_and_flow() -> None:
    deployment = build_deployment("0 3 * * *", name="nightly", repo_dir="/srv/project")
    assert deployment.name == "nightly"
    assert deployment.flow_name == post_training.name
    (schedule,) = deployment.schedules
    assert schedule.schedule.cron == "0 3 * * *"
    assert deployment.parameters == {"repo_dir": "/srv/project"}
