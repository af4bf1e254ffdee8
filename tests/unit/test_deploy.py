"""The scheduled deployment is a real Prefect deployment of the post-training flow."""

from __future__ import annotations

import pytest

from components.errors import PosttrainError
from flows.cli import main
from flows.deploy import build_deployment, validate_schedule
from flows.post_training import post_training


def test_deployment_carries_the_cron_schedule_and_flow() -> None:
    deployment = build_deployment("0 3 * * *", name="nightly", repo_dir="/srv/project")
    assert deployment.name == "nightly"
    assert deployment.flow_name == post_training.name
    (schedule,) = deployment.schedules
    assert schedule.schedule.cron == "0 3 * * *"
    assert deployment.parameters == {"repo_dir": "/srv/project"}


def test_deployment_has_an_interval_schedule_stages_and_no_overlap() -> None:
    deployment = build_deployment(interval=600, repo_dir="/srv/project", stages=["ingest"])
    (schedule,) = deployment.schedules
    assert schedule.schedule.interval.total_seconds() == 600
    assert deployment.parameters == {"repo_dir": "/srv/project", "stages": ["ingest"]}
    assert deployment.concurrency_limit == 1


@pytest.mark.parametrize("command", ["serve", "deploy"])
def test_bad_cron_is_a_one_line_error(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    extra = ["--pool", "p"] if command == "deploy" else []
    with pytest.raises(SystemExit) as exc:
        main([command, *extra, "--cron", "bogus cron"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err == f"posttrain {command}: error: --cron 'bogus cron': not a valid cron expression\n"


def test_non_positive_interval_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--interval", "0"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("args", [[], ["--cron", "0 3 * * *", "--interval", "60"]])
def test_serve_needs_exactly_one_of_cron_and_interval(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["serve", *args])
    assert exc.value.code == 2
    assert "--interval" in capsys.readouterr().err
    with pytest.raises(PosttrainError, match="exactly one"):
        validate_schedule(None, None)


def test_deploy_needs_a_prefect_server(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with pytest.raises(SystemExit) as exc:
        main(["deploy", "--pool", "p", "--interval", "60"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("posttrain deploy: error: PREFECT_API_URL is not set") and err.count("\n") == 1


def test_a_local_server_that_does_not_start_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.deploy

    monkeypatch.setattr(flows.deploy, "_prefect_cli", lambda: ["false"])
    with pytest.raises(PosttrainError, match="local Prefect server exited with code 1"):
        with flows.deploy.local_server(timeout=5):
            pass
