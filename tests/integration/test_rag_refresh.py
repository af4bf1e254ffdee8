"""The rag-refresh flow: real Prefect, real DVC, real Milvus Lite, in a fresh git + DVC project.

Run in process (Prefect's ephemeral API): the first refresh builds the RAG stages, a second one
with unchanged documents runs nothing, and editing one document re-runs exactly the RAG stages
(DVC versions the new index). The reranker stage is disabled in this project to keep the test
short: its training is covered by tests/integration/test_rag_reranker_learns.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import make_repo, sh

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_repo(tmp_path_factory.mktemp("refresh") / "repo")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["rag_reranker"]["enabled"] = False
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(["git", "commit", "-qam", "no reranker"], root)
    return root


def test_refresh_builds_then_skips_then_reindexes_a_changed_doc(project: Path, monkeypatch) -> None:
    from flows.rag_refresh import RAG_STAGES, rag_refresh

    monkeypatch.chdir(project)
    first = rag_refresh(repo_dir=str(project), track=False)
    n_docs = len(list((project / "data/docs").iterdir()))
    assert first["docs"] == {"added": n_docs, "changed": 0, "deleted": 0, "unchanged": 0}
    assert first["stages"] == dict.fromkeys(RAG_STAGES, "ran")
    assert (project / "metrics/rag_eval.json").is_file()

    again = rag_refresh(repo_dir=str(project), track=False)
    assert again["docs"] == {"added": 0, "changed": 0, "deleted": 0, "unchanged": n_docs}
    assert again["stages"] == dict.fromkeys(RAG_STAGES, "skipped")

    faq = project / "data/docs/visitor-faq.txt"
    faq.write_text(faq.read_text() + "\nIs there a night bus in Kope?\nYes, line N1 runs every hour.\n")
    changed = rag_refresh(repo_dir=str(project), track=False)
    assert changed["docs"] == {"added": 0, "changed": 1, "deleted": 0, "unchanged": n_docs - 1}
    assert changed["stages"]["rag_index"] == "ran"
    from components.rag.store import open_store

    with open_store(str(project / "data/rag/milvus.db"), "posttrain_docs") as store:
        hits = store.search("night bus line N1", None, mode="sparse", top_k=1)
    assert hits and hits[0].source == "data/docs/visitor-faq.txt" and "N1" in hits[0].text


def test_serve_refuses_stages_for_the_refresh_flow() -> None:
    from components.errors import PosttrainError
    from flows.deploy import _parameters

    with pytest.raises(PosttrainError, match="--stages applies to the post-training flow only"):
        _parameters(".", ["sft"], "rag-refresh")
    assert _parameters("/repo", None, "rag-refresh") == {"repo_dir": "/repo"}
