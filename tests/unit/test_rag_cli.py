"""``posttrain rag`` argument parsing, defaults and user errors (no model is loaded here)."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from components.errors import DataError, MissingInputError, PosttrainError
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


# -- ingest --prune, --filter, --rerank, ask and eval ------------------------------------------


def test_new_options_and_commands_parse():
    args = _parser().parse_args(["rag", "ingest", "docs", "--prune", "--json"])
    assert (args.func, args.prune, args.json) == (rag_cli.cmd_ingest, True, True)
    assert _parser().parse_args(["rag", "ingest", "docs"]).prune is False  # pruning is opt-in
    args = _parser().parse_args(["rag", "query", "q", "--filter", 'file_type == "pdf"', "--no-rerank"])
    assert (args.filter, args.rerank) == ('file_type == "pdf"', False)
    args = _parser().parse_args(["rag", "query", "q"])
    assert (args.filter, args.rerank) == (None, None)  # None: rerank when a reranker exists
    args = _parser().parse_args(
        [
            "rag",
            "ask",
            "Why?",
            "--json",
            "--mode",
            "generative",
            "--generator",
            "smollm2",
            "--rerank",
            "-k",
            "3",
        ]
    )
    assert args.func is rag_cli.cmd_ask
    assert (args.question, args.json, args.mode, args.generator, args.rerank, args.top_k) == (
        "Why?",
        True,
        "generative",
        "smollm2",
        True,
        3,
    )
    args = _parser().parse_args(["rag", "ask", "Why?"])
    assert (args.mode, args.generator, args.filter) == (None, None, None)  # from params.yaml at run time
    args = _parser().parse_args(["rag", "eval", "q.jsonl", "--json", "--no-mlflow"])
    assert (args.func, args.questions, args.json, args.no_mlflow) == (rag_cli.cmd_eval, "q.jsonl", True, True)


@pytest.mark.parametrize(
    "argv",
    [
        ["rag", "ask"],
        ["rag", "ask", "q", "--mode", "abstractive"],
        ["rag", "ask", "q", "--top-k", "0"],
        ["rag", "eval"],
    ],
)
def test_bad_usage_of_ask_and_eval_exits_2(argv):
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(argv)
    assert exc.value.code == 2


def test_ask_and_eval_help_read_like_a_manual():
    parser = _parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    rag_sub = next(a for a in sub.choices["rag"]._actions if isinstance(a, argparse._SubParsersAction))
    ask_help = rag_sub.choices["ask"].format_help()
    for word in ("examples:", "posttrain rag ask", "extractive", "generative", '"flagged"', "--filter"):
        assert word in ask_help
    eval_help = rag_sub.choices["eval"].format_help()
    for word in ("examples:", "posttrain rag eval", "recall@1", "MRR@10", "nDCG@10", "--no-mlflow"):
        assert word in eval_help
    ingest_help = rag_sub.choices["ingest"].format_help()
    assert "--prune" in ingest_help and "incremental" in ingest_help.lower()
    query_help = rag_sub.choices["query"].format_help()
    for word in ("--filter", "--rerank", "--no-rerank", '"metadata"'):
        assert word in query_help


LONG = "x" * 10_000


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["query", LONG], "the question is 10,000 characters long; at most 2,000"),
        (["query", LONG, "--mode", "sparse"], "the question is 10,000 characters long; at most 2,000"),
        (["ask", LONG], "the question is 10,000 characters long; at most 2,000"),
        (["ask", "   "], "the question is empty"),
        (["eval", "missing.jsonl"], "missing.jsonl: no such question file"),
    ],
)
def test_question_errors_are_one_line_before_any_index_is_opened(
    argv, message, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    assert rag_cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("posttrain rag: error: ") and message in err
    assert len(err.splitlines()) == 1 and LONG not in err  # the question is not echoed back
    assert list(tmp_path.iterdir()) == []  # failed before opening (and creating) any index


def test_a_long_question_in_a_batch_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "q.jsonl").write_text(f'{{"id": 1, "question": "ok?"}}\n{{"id": 2, "question": "{LONG}"}}\n')
    assert rag_cli.main(["query", "--batch", "q.jsonl"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and "10,000 characters long" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.jsonl"]


def test_question_length_limit_is_inclusive():
    from components.rag.service import MAX_QUESTION_CHARACTERS, check_question

    assert MAX_QUESTION_CHARACTERS == 2000
    assert check_question("  " + "y" * 2000 + "\n") == "y" * 2000  # stripped, then measured
    with pytest.raises(PosttrainError, match="2,001 characters long"):
        check_question("y" * 2001)


def test_eval_malformed_question_line_names_file_and_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "q.jsonl").write_text(
        '{"id": 1, "question": "Where?", "relevant": ["docs/a.md"]}\n{"id": 2, "question": "Why?"}\n'
    )
    assert rag_cli.main(["eval", "q.jsonl", "--no-mlflow"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == 'posttrain rag: error: q.jsonl:2: "relevant" must be a non-empty list of source paths\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.jsonl"]  # no index was opened


def test_format_eval_prints_one_row_per_mode():
    scores = {
        "recall_at_1": 0.5,
        "recall_at_5": 1.0,
        "recall_at_10": 1.0,
        "mrr_at_10": 0.75,
        "ndcg_at_10": 0.8155,
    }
    report = {
        "n_questions": 2,
        "default_mode": "hybrid",
        "modes": {"dense": scores, "hybrid": {**scores, "recall_at_1": 1.0}},
        "answers": {"n": 2, "answer_containment": 0.5, "evidence_containment": 1.0, "refusal_rate": 0.0},
    }
    lines = rag_cli.format_eval(report).splitlines()
    assert lines[0] == "2 questions; default mode: hybrid"
    assert lines[2].split() == ["mode", "recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10"]
    assert lines[3].split() == ["dense", "0.500", "1.000", "1.000", "0.750", "0.816"]
    assert lines[4].split()[:2] == ["hybrid", "1.000"]
    assert lines[-1].startswith("answers (2 with an expected answer): answer contains it 0.500")


def test_read_batch_names_the_line_of_a_bad_byte(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_bytes(b'{"id": 1, "question": "fine"}\n{"id": 2, "question": "caf\xe9?"}\n')
    with pytest.raises(DataError, match=r":2: not valid UTF-8"):
        rag_cli.read_batch(str(path))
