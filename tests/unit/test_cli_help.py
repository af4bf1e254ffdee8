"""``posttrain`` CLI: help text lists every command; ``validate`` reports one clear line."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from flows.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = (
    "run",
    "status",
    "profile",
    "serve",
    "deploy",
    "rag",
    "validate",
    "promote",
    "models",
    "runs",
    "metrics",
    "plots",
    "compare",
    "deltas",
)


def _exit_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code


def test_help_lists_every_command():
    text = build_parser().format_help()
    assert text.startswith("usage: posttrain")
    for command in COMMANDS:
        assert re.search(rf"^\s+{command}\s+\S", text, re.MULTILINE), f"{command} missing from --help"


def test_help_flag_exits_zero_and_prints_help(capsys):
    assert _exit_code(["--help"]) == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command in out
    assert "examples:" in out  # the epilog with worked examples is shown


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_its_own_help(command, capsys):
    assert _exit_code([command, "--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: posttrain {command}")


def test_no_command_is_a_usage_error(capsys):
    assert _exit_code([]) == 2
    assert "usage: posttrain" in capsys.readouterr().err


def test_serve_requires_cron(capsys):
    assert _exit_code(["serve"]) == 2
    assert "--cron" in capsys.readouterr().err


def test_run_arguments_parse():
    args = build_parser().parse_args(["run", "--stages", "sft", "evaluate", "--force", "--no-track"])
    assert (args.command, args.stages, args.force, args.no_track) == ("run", ["sft", "evaluate"], True, True)
    args = build_parser().parse_args(["run"])
    assert (args.stages, args.force, args.no_track, args.profile) == (None, False, False, None)
    assert build_parser().parse_args(["run", "--profile", "smollm2-135m"]).profile == "smollm2-135m"


def test_validate_ok_on_shipped_params(capsys):
    params = ROOT / "params.yaml"
    assert _exit_code(["validate", "--params", str(params)]) == 0
    assert capsys.readouterr().out.strip() == f"{params}: ok"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("sft:\n  peft:\n    rr: 8\n", "sft.peft.rr"),
        ("sft:\n  epochs: three\n", "sft.epochs"),
        ("align:\n  method: ppo_typo\n", "align.method"),
        ("ingest:\n  tasks: [add, 3]\n", "ingest.tasks[1]"),
    ],
)
def test_validate_bad_params_exits_2_with_one_line_naming_the_key(tmp_path, capsys, text, key):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    assert _exit_code(["validate", "--params", str(path)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err  # one line, no traceback
    assert lines[0].startswith("posttrain validate: error: ")
    assert f"{key}:" in lines[0]
    assert "ok" not in captured.out


def test_validate_missing_file_names_the_path(tmp_path, capsys):
    path = tmp_path / "missing.yaml"
    assert _exit_code(["validate", "--params", str(path)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and str(path) in lines[0]


def test_validate_invalid_yaml_names_the_path(tmp_path, capsys):
    path = tmp_path / "params.yaml"
    path.write_text("sft: [unclosed\n")
    assert _exit_code(["validate", "--params", str(path)]) == 2
    err = capsys.readouterr().err
    assert re.match(rf"posttrain validate: error: {re.escape(str(path))}:\d+: not valid YAML", err)
    assert "Traceback" not in err


def test_validate_invalid_yaml_is_one_line(tmp_path, capsys):
    path = tmp_path / "params.yaml"
    path.write_text("sft: [unclosed\n")
    assert _exit_code(["validate", "--params", str(path)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert str(path) in lines[0]


def test_validate_reports_every_problem_at_once_one_line_each(tmp_path, capsys):
    path = tmp_path / "params.yaml"
    path.write_text(
        "sft:\n  learning_rate: -1\n  batch_size: 0\n  lr_scheduler: bogus\n"
        "preferences:\n  k: 0\n  temperature: -1\n  eval_fraction: 1.5\n"
        "base:\n  num_heads: 3\n"
        "ingest:\n  n_eval_prompts: 0\n"
        "evaluate:\n  n_prompts: 0\n"
        "rag_index:\n  chunk_overlap_tokens: 600\n"
    )
    assert _exit_code(["validate", "--params", str(path)]) == 2
    captured = capsys.readouterr()
    assert "ok" not in captured.out
    lines = captured.err.splitlines()
    assert all(line.startswith("posttrain validate: error: ") for line in lines), lines
    keys = [line.removeprefix("posttrain validate: error: ").split(":")[0] for line in lines]
    assert keys == [
        "base.num_heads",
        "ingest.n_eval_prompts",
        "sft.learning_rate",
        "sft.batch_size",
        "sft.lr_scheduler",
        "preferences.k",
        "preferences.temperature",
        "preferences.eval_fraction",
        "evaluate.n_prompts",
        "rag_index.chunk_overlap_tokens",
    ]
    assert "posttrain validate: error: sft.learning_rate: must be >= 0, got -1.0" in lines


def test_validate_accepts_exponent_floats(tmp_path, capsys):
    path = tmp_path / "params.yaml"
    path.write_text("sft:\n  learning_rate: 3e-3\nreward_model:\n  learning_rate: 1E-4\n")
    assert _exit_code(["validate", "--params", str(path)]) == 0
    assert capsys.readouterr().out.strip() == f"{path}: ok"


def test_unknown_stage_fails_in_one_line_before_prefect_starts(tmp_path):
    import shutil
    import subprocess
    import sys

    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--stages", "bogus"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "posttrain run: error: unknown stage 'bogus' (stages: base, ingest, sft, preferences, "
        "reward_model, align, compress, evaluate, rag_index, rag_reranker, rag_eval, multimodal)"
    ]
    assert "temporary server" not in proc.stdout + proc.stderr


def test_a_closed_pipe_ends_the_command_quietly(monkeypatch, tmp_path):
    import sys

    from flows import cli

    sink = (tmp_path / "sink").open("w")

    class ClosedPipe:
        def write(self, text: str) -> int:
            raise BrokenPipeError

        def flush(self) -> None:
            raise BrokenPipeError

        def fileno(self) -> int:
            return sink.fileno()

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["validate", "--params", str(ROOT / "params.yaml")])
    assert exit_info.value.code == 0
