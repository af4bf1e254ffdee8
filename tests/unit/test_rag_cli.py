"""``posttrain rag`` argument parsing, defaults and user errors (no model is loaded here)."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from components.errors import DataError, MissingInputError
from components.params import RagIndexConfig
from flows import rag_cli


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="posttrain")
    rag_cli.add_rag_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_leaf_commands_dispatch_through_func():
    args = _parser().parse_args(["rag", "ingest", "a.md", "docs"])
    assert args.func is rag_cli.cmd_ingest and args.paths == ["a.md", "docs"]
    args = _parser().parse_args(["rag", "query", "What is Gubu?"])
    assert args.func is rag_cli.cmd_query
    assert (args.question, args.json, args.batch) == ("What is Gubu?", False, None)
    # --top-k, --mode, --collection and --uri are resolved from params.yaml at run time.
    assert args.top_k is None and args.mode is None
    assert args.collection is None and args.uri is None
    defaults = rag_cli.rag_config("no-such-params.yaml")
    assert (defaults.top_k, defaults.mode) == (5, "hybrid")
    args = _parser().parse_args(
        ["rag", "query", "--batch", "q.jsonl", "-k", "3", "--mode", "sparse", "--json"]
    )
    assert (args.question, args.batch, args.top_k, args.mode, args.json) == (
        None,
        "q.jsonl",
        3,
        "sparse",
        True,
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["rag"],
        ["rag", "ingest"],
        ["rag", "query", "q", "--top-k", "0"],
        ["rag", "query", "q", "--mode", "fuzzy"],
    ],
)
def test_bad_usage_exits_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(argv)
    assert exc.value.code == 2


def test_help_reads_like_a_manual():
    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    rag = sub.choices["rag"]
    rag_sub = next(a for a in rag._actions if isinstance(a, argparse._SubParsersAction))
    for p in (rag, rag_sub.choices["ingest"], rag_sub.choices["query"]):
        text = p.format_help()
        assert "examples:" in text and "posttrain rag " in text
    query_help = rag_sub.choices["query"].format_help()
    for word in ("dense", "sparse", "hybrid", "--batch", '"hits"', "params.yaml"):
        assert word in query_help


def test_defaults_come_from_params_yaml_in_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert rag_cli.rag_config() == RagIndexConfig()
    (tmp_path / "params.yaml").write_text("rag_index:\n  collection: mine\n  uri: idx/m.db\n")
    cfg = rag_cli.rag_config()
    assert (cfg.collection, cfg.uri) == ("mine", "idx/m.db")


def test_query_uses_params_defaults_and_never_creates_an_index(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("rag_index:\n  collection: mine\n  uri: idx/m.db\n")
    code = rag_cli.main(["query", "anything", "--mode", "sparse"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.startswith("posttrain rag: error: no index at idx/m.db; build it with `posttrain rag ingest")
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "idx").exists()


def test_invalid_params_yaml_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("rag_index:\n  top_k: many\n")
    assert rag_cli.main(["query", "q"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("posttrain rag: error: rag_index.top_k: expected int") and len(err.splitlines()) == 1
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["query"], "a QUESTION (or --batch FILE) is required"),
        (["query", "q", "--batch", "x.jsonl"], "not both"),
        (["query", "--batch", "missing.jsonl"], "missing.jsonl: no such file"),
        (["ingest", "missing-dir"], "missing-dir: no such file or directory"),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert rag_cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("posttrain rag: error: ") and message in err
    assert len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # failed before opening (and creating) any index


def test_read_batch_accepts_blank_lines_and_any_id(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"id": 1, "question": "a?"}\n\n  \n{"id": "x", "question": "b?", "extra": 1}\n')
    assert rag_cli.read_batch(str(path)) == [(1, "a?"), ("x", "b?")]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"id": 2, "question": ', "not valid JSON"),
        ('["id", "question"]', "expected a JSON object"),
        ('{"question": "no id"}', 'missing "id"'),
        ('{"id": 2, "question": ""}', '"question" must be a non-empty string'),
        ('{"id": 2, "question": 5}', '"question" must be a non-empty string'),
    ],
)
def test_read_batch_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "q.jsonl"
    path.write_text('{"id": 1, "question": "fine"}\n' + line + "\n")
    with pytest.raises(DataError) as exc:
        rag_cli.read_batch(str(path))
    assert str(exc.value).startswith(f"{path}:2: ") and message in str(exc.value)


def test_read_batch_missing_file():
    with pytest.raises(MissingInputError, match="nope.jsonl"):
        rag_cli.read_batch("nope.jsonl")


def test_importing_the_cli_loads_no_heavy_library():
    code = (
        "import sys, flows.rag_cli; "
        "names = ('pymilvus', 'unstructured', 'torch', 'sentence_transformers'); "
        "heavy = [m for m in names if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
