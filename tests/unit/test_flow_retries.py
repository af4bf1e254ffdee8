"""Which stage failures the flow retries, and how a user error reaches the command line."""

from __future__ import annotations

import logging
import sys

import pytest

from components.errors import PosttrainError
from flows.post_training import (
    StageFailed,
    StageUserError,
    _not_user_error,
    _NoTracebackForUserErrors,
)


class _State:
    def __init__(self, exc: BaseException | None) -> None:
        self.exc = exc

    def result(self):  # noqa: ANN201
        if self.exc is not None:
            raise self.exc
        return "ran"


@pytest.mark.parametrize(
    ("exc", "retry"),
    [
        (StageUserError("ingest", "mine.jsonl:2: not valid JSON"), False),
        (StageFailed("ingest", 2), False),
        (StageFailed("ingest", 255), True),  # dvc repro's code when its command was killed
        (OSError("disk full"), True),
        (None, False),
    ],
)
def test_only_transient_failures_are_retried(exc: BaseException | None, retry: bool) -> None:
    assert _not_user_error(None, None, _State(exc)) is retry


def test_user_error_is_a_one_line_posttrain_error() -> None:
    exc = StageUserError("ingest", "mine.jsonl:2: not valid JSON")
    assert isinstance(exc, PosttrainError) and exc.returncode == 2
    assert str(exc) == "stage 'ingest': mine.jsonl:2: not valid JSON"  # cli: "posttrain run: error: " + this


def _record(exc: BaseException) -> logging.LogRecord:
    try:
        raise exc
    except BaseException:
        return logging.LogRecord(
            "prefect.task_runs", logging.ERROR, __file__, 1, "failed", None, sys.exc_info()
        )


def test_prefect_logs_drop_the_traceback_of_user_errors_only() -> None:
    quiet = _NoTracebackForUserErrors()
    user = _record(StageUserError("ingest", "bad line"))
    assert quiet.filter(user) and user.exc_info is None
    crash = _record(StageFailed("sft", 255))
    assert quiet.filter(crash) and crash.exc_info is not None
