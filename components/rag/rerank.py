"""A cross-encoder reranker that the pipeline trains itself, from its own corpus, offline.

Why: dense retrieval with MiniLM (``embedding.py``) ranks chunks by one vector each; a
cross-encoder reads the query and a chunk together and orders a short candidate list much
better. No package ships cross-encoder weights for offline use, but the bundled MiniLM loads as a
``CrossEncoder`` with a freshly initialised one-logit head, and ``CrossEncoderTrainer`` fine-tunes
it on CPU. Training data needs no generator model:

* queries are the chunk's section title, or one of its sentences ("inverse cloze": the sentence
  is removed from the positive passage, so matching it is not a trivial copy);
* negatives are the chunks a small Okapi BM25 ranks highest for the query (hard negatives: they
  share words with the query but are not the chunk it came from), random chunks as a fall-back.

Pairs are split by positive chunk (:func:`split_pairs`) so held-out queries measure how the
reranker generalises to chunks it never saw as positives (:func:`evaluate_pairs`).
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from components.errors import PosttrainError
from components.rag.embedding import BUNDLED_MINILM, resolve_model_path

if TYPE_CHECKING:
    from sentence_transformers import CrossEncoder

T = TypeVar("T")

# Short English stopword list: function words that carry no topic, so BM25 does not pick
# "negatives" merely because they share "the" and "of" with the query.
STOPWORDS: frozenset[str] = frozenset(
    """a an and are as at be but by for from has have he her his i if in into is it its of on or
    our she so than that the their them then there these they this those to was we were what when
    where which who will with you your""".split()
)

_WORD = re.compile(r"\w+")
# A sentence ends at . ! or ? followed by whitespace, or at a line break (lists, headings).
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|\s*\n\s*")


def tokenize(text: str) -> list[str]:
    """Lowercase ``\\w+`` tokens without :data:`STOPWORDS`."""
    return [t for t in _WORD.findall(text.lower()) if t not in STOPWORDS]


def _norm(text: str) -> str:
    """Whitespace-collapsed, lowercased text: the key for "same text" and "same title"."""
    return " ".join(text.split()).lower()


def _n_words(text: str) -> int:
    return len(text.split())


@dataclass(frozen=True)
class Passage:
    """One chunk as the reranker sees it; ``title`` is its section heading when known."""

    chunk_id: str
    source: str
    text: str
    title: str = ""


@dataclass(frozen=True)
class TrainPair:
    """One (query, passage) example; ``label`` 1.0 for the positive, 0.0 for a negative.

    ``group`` is the positive passage's ``chunk_id``: all queries made from one passage share it,
    and :func:`split_pairs` never puts one group on both sides of a split.
    """

    query: str
    passage: str
    label: float
    group: str


class BM25:
    """Okapi BM25 (``k1`` = 1.5, ``b`` = 0.75) over :func:`tokenize` tokens.

    ``idf(t) = ln(1 + (N - df + 0.5) / (df + 0.5))`` (the Lucene form, never negative), and a
    document's score is ``sum over distinct query terms t of
    idf(t) * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len / avg_len))``.
    """

    def __init__(self, texts: Sequence[str], k1: float = 1.5, b: float = 0.75) -> None:
        self.k1 = k1
        self.b = b
        counts = [Counter(tokenize(text)) for text in texts]
        self.n_docs = len(counts)
        self.lengths = np.array([sum(c.values()) for c in counts], dtype=np.float64)
        self.avg_length = float(self.lengths.mean()) if self.n_docs and self.lengths.sum() else 1.0
        postings: dict[str, tuple[list[int], list[int]]] = {}
        for doc, count in enumerate(counts):
            for term, tf in count.items():
                docs, tfs = postings.setdefault(term, ([], []))
                docs.append(doc)
                tfs.append(tf)
        self.postings = {
            term: (np.array(docs, dtype=np.int64), np.array(tfs, dtype=np.float64))
            for term, (docs, tfs) in postings.items()
        }
        self.idf = {
            term: math.log(1.0 + (self.n_docs - len(docs) + 0.5) / (len(docs) + 0.5))
            for term, (docs, _) in self.postings.items()
        }
        self._norm = k1 * (1.0 - b + b * self.lengths / self.avg_length)

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every document for ``query``: a float64 array of length ``n_docs``."""
        out = np.zeros(self.n_docs, dtype=np.float64)
        for term in dict.fromkeys(tokenize(query)):
            if term not in self.postings:
                continue
            docs, tfs = self.postings[term]
            out[docs] += self.idf[term] * tfs * (self.k1 + 1.0) / (tfs + self._norm[docs])
        return out

    def top(self, query: str, k: int, exclude: Iterable[int] = ()) -> list[int]:
        """Up to ``k`` document indices with a positive score, best first (ties: lower index first)."""
        if k <= 0:
            return []
        scores = self.scores(query)
        skip = set(exclude)
        matches = np.flatnonzero(scores > 0.0)
        ranked = matches[np.lexsort((matches, -scores[matches]))]  # score descending, then index
        return [int(i) for i in ranked if int(i) not in skip][:k]


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_BREAK.split(text) if s and s.strip()]


def _queries_for(
    passage: Passage, rng: np.random.Generator, n_queries: int, min_words: int
) -> list[tuple[str, str, str]]:
    """``(kind, query, positive text)`` triples for one passage; kind is "title" or "cloze"."""
    if n_queries <= 0 or _n_words(passage.text) < min_words:
        return []
    out: list[tuple[str, str, str]] = []
    title = " ".join(passage.title.split())
    if _n_words(title) >= 2 and _norm(title) != _norm(passage.text):
        out.append(("title", title, passage.text))
    candidates: list[tuple[str, str]] = []
    for sentence in _sentences(passage.text):
        if _n_words(sentence) < min_words:
            continue
        rest = " ".join(passage.text.replace(sentence, " ", 1).split())
        if _n_words(rest) >= min_words and sentence not in rest:
            candidates.append((sentence, rest))
    n_cloze = min(n_queries - len(out), len(candidates))
    if n_cloze > 0:
        for i in sorted(rng.choice(len(candidates), size=n_cloze, replace=False).tolist()):
            sentence, rest = candidates[i]
            out.append(("cloze", sentence, rest))
    return out


def _random_others(
    rng: np.random.Generator, n: int, need: int, taken: Sequence[int], eligible: Callable[[int], bool]
) -> list[int]:
    """``need`` random eligible indices not in ``taken``: a cheap sample first, a full scan if short."""
    skip = set(taken)
    sample = rng.choice(n, size=min(n, 4 * need + 8), replace=False)
    out = [int(j) for j in sample if int(j) not in skip and eligible(int(j))][:need]
    if len(out) < need:
        skip.update(out)
        rest = [j for j in range(n) if j not in skip and eligible(j)]
        out.extend(rest[int(e)] for e in rng.permutation(len(rest))[: need - len(out)])
    return out


def build_pairs(
    passages: Sequence[Passage],
    *,
    seed: int,
    queries_per_passage: int = 2,
    negatives: int = 3,
    min_words: int = 6,
) -> list[TrainPair]:
    """Training pairs made from the passages themselves: one positive and hard negatives per query.

    Each passage with at least ``min_words`` words yields up to ``queries_per_passage`` queries:
    its title first (when it has >= 2 words and is not the whole text), then inverse-cloze
    sentences (>= ``min_words`` words each) sampled with ``numpy.random.default_rng(seed)`` and
    cut out of the positive. Each query is followed by ``negatives`` negatives: the top BM25
    passages that are not the positive, not a copy of its text, do not contain the cloze
    sentence and do not share the title query; random such passages fill the gap when BM25
    finds too few. Fewer negatives only when the corpus has too few eligible passages; a query
    with none is dropped.
    """
    rng = np.random.default_rng(seed)
    bm25 = BM25([p.text for p in passages])
    norm_texts = [_norm(p.text) for p in passages]
    norm_titles = [_norm(p.title) for p in passages]
    pairs: list[TrainPair] = []
    for i, passage in enumerate(passages):
        for kind, query, positive in _queries_for(passage, rng, queries_per_passage, min_words):
            key = _norm(query)

            def eligible(j: int, i: int = i, kind: str = kind, key: str = key) -> bool:
                if j == i or norm_texts[j] == norm_texts[i]:
                    return False
                if kind == "title":
                    return norm_titles[j] != key
                return key not in norm_texts[j]

            chosen = [j for j in bm25.top(query, negatives + 16, exclude={i}) if eligible(j)][:negatives]
            if len(chosen) < negatives:
                chosen.extend(_random_others(rng, len(passages), negatives - len(chosen), chosen, eligible))
            if not chosen:
                continue
            pairs.append(TrainPair(query, positive, 1.0, passage.chunk_id))
            pairs.extend(TrainPair(query, passages[j].text, 0.0, passage.chunk_id) for j in chosen)
    return pairs


def split_pairs(
    pairs: Sequence[TrainPair], eval_share: float, seed: int
) -> tuple[list[TrainPair], list[TrainPair]]:
    """``(train, eval)`` split by group: about ``eval_share`` of the positive passages go to eval.

    With ``eval_share`` > 0 and at least two groups, each side gets at least one group. Pairs keep
    their order within each side.
    """
    if not 0.0 <= eval_share < 1.0:
        raise PosttrainError(f"reranker eval_share must be in [0, 1), got {eval_share}")
    groups = list(dict.fromkeys(p.group for p in pairs))
    n_eval = int(round(len(groups) * eval_share))
    if eval_share > 0 and len(groups) >= 2:
        n_eval = min(max(n_eval, 1), len(groups) - 1)
    order = np.random.default_rng(seed).permutation(len(groups))
    held_out = {groups[int(g)] for g in order[:n_eval]}
    train = [p for p in pairs if p.group not in held_out]
    evaluation = [p for p in pairs if p.group in held_out]
    return train, evaluation


@contextmanager
def _quiet_hf(progress: bool = False) -> Iterator[None]:
    """Mute transformers / sentence-transformers / datasets logs and bars (bars kept if ``progress``).

    Loading MiniLM as a cross-encoder logs a "LOAD REPORT" of the newly initialised head and a
    "Converting SentenceTransformer model" line: expected here, so noise.
    """
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    ds_bars_off = are_progress_bars_disabled()
    st_logger = logging.getLogger("sentence_transformers")
    st_level = st_logger.level
    hf_logging.set_verbosity_error()
    st_logger.setLevel(logging.ERROR)
    if not progress:
        hf_logging.disable_progress_bar()
        disable_progress_bars()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        st_logger.setLevel(st_level)
        if bars:
            hf_logging.enable_progress_bar()
        if not ds_bars_off:
            enable_progress_bars()


def load_base_cross_encoder(
    base: str = BUNDLED_MINILM, *, max_length: int = 256, seed: int = 0
) -> CrossEncoder:
    """``base`` (``minilm`` or a local directory) as a one-logit CrossEncoder on CPU.

    The classification head is new: its initial weights come from ``seed``, so the untrained
    baseline is reproducible too.
    """
    from sentence_transformers import CrossEncoder
    from transformers import set_seed

    path = resolve_model_path(base)
    set_seed(seed)
    with _quiet_hf():
        try:
            return CrossEncoder(str(path), num_labels=1, max_length=max_length, device="cpu")
        except (OSError, ValueError) as exc:
            raise PosttrainError(f"cannot load reranker base model from {path}: {exc}") from None


def _logging_steps(n_pairs: int, batch_size: int, epochs: int, points: int = 20) -> int:
    steps = max(1, -(-n_pairs // batch_size) * epochs)
    return max(1, min(10, steps // points))


def fit_cross_encoder(
    pairs: Sequence[TrainPair],
    *,
    base: str = BUNDLED_MINILM,
    epochs: int = 1,
    batch_size: int = 16,
    learning_rate: float = 2e-5,
    seed: int = 0,
    max_length: int = 256,
    progress: bool = False,
) -> tuple[CrossEncoder, dict[str, Any]]:
    """Fine-tune ``base`` on ``pairs`` with binary cross-entropy; returns the model and run stats.

    Positives are weighted by the negatives-per-positive ratio so the loss does not learn "always
    no". The trainer writes only to a temporary directory, removed afterwards.
    """
    import torch
    from datasets import Dataset
    from sentence_transformers.cross_encoder import CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss
    from transformers import PrinterCallback

    n_pos = sum(1 for p in pairs if p.label >= 0.5)
    if not pairs or n_pos == 0 or n_pos == len(pairs):
        raise PosttrainError(
            f"reranker training needs positive and negative pairs, got {n_pos} positive of {len(pairs)} "
            "(too few passages with enough text?)"
        )
    start = time.perf_counter()
    model = load_base_cross_encoder(base, max_length=max_length, seed=seed)
    # Column order matters: the loss pairs the first two columns (query, passage); "label" is the target.
    data = Dataset.from_dict(
        {
            "query": [p.query for p in pairs],
            "passage": [p.passage for p in pairs],
            "label": [float(p.label) for p in pairs],
        }
    )
    loss = BinaryCrossEntropyLoss(model, pos_weight=torch.tensor((len(pairs) - n_pos) / n_pos))
    work = Path(tempfile.mkdtemp(prefix="rerank-train-"))
    try:
        with _quiet_hf(progress):
            args = CrossEncoderTrainingArguments(
                output_dir=str(work),
                num_train_epochs=epochs,
                per_device_train_batch_size=batch_size,
                learning_rate=learning_rate,
                warmup_steps=0.1,
                seed=seed,
                data_seed=seed,
                report_to="none",
                eval_strategy="no",
                save_strategy="no",
                logging_steps=_logging_steps(len(pairs), batch_size, epochs),
                use_cpu=True,
                dataloader_num_workers=0,
                disable_tqdm=not progress,
            )
            trainer = CrossEncoderTrainer(model=model, args=args, train_dataset=data, loss=loss)
            if not progress:
                trainer.remove_callback(PrinterCallback)  # prints every log dict when tqdm is off
            result = trainer.train()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    model.eval()
    stats = {
        "train_pairs": len(pairs),
        "steps": int(result.global_step),
        "train_loss": float(result.training_loss),
        "seconds": round(time.perf_counter() - start, 2),
    }
    return model, stats


def save_reranker(model: CrossEncoder, out_dir: Path | str) -> Path:
    """Write ``model`` (safetensors, no model card) so ``CrossEncoder(str(out_dir))`` reloads it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with _quiet_hf():
        model.save_pretrained(str(out), create_model_card=False)
    return out


def train_reranker(
    pairs: Sequence[TrainPair],
    out_dir: Path,
    *,
    base: str = BUNDLED_MINILM,
    epochs: int = 1,
    batch_size: int = 16,
    learning_rate: float = 2e-5,
    seed: int = 0,
    max_length: int = 256,
    progress: bool = False,
) -> dict[str, Any]:
    """Fine-tune a reranker on ``pairs`` and save it to ``out_dir``.

    Returns ``{"train_pairs", "steps", "train_loss" (mean over the run), "seconds"}``.
    """
    model, stats = fit_cross_encoder(
        pairs,
        base=base,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
        max_length=max_length,
        progress=progress,
    )
    save_reranker(model, out_dir)
    return stats


def _logits(model: CrossEncoder, pairs: list[tuple[str, str]], batch_size: int) -> np.ndarray:
    import torch

    if not pairs:
        return np.zeros(0, dtype=np.float32)
    out = model.predict(
        pairs,
        batch_size=batch_size,
        show_progress_bar=False,
        activation_fn=torch.nn.Identity(),
        convert_to_numpy=True,
    )
    return np.asarray(out, dtype=np.float32).reshape(-1)


class Reranker:
    """A trained cross-encoder on CPU: raw logits for (query, text) pairs, higher = more relevant."""

    def __init__(self, path: str | Path, batch_size: int = 32) -> None:
        self.path = Path(path).expanduser()
        self.batch_size = batch_size
        if not (self.path / "config.json").is_file():
            raise PosttrainError(
                f"no reranker model at {self.path}: expected a directory saved by train_reranker "
                "(config.json, model.safetensors)"
            )
        from sentence_transformers import CrossEncoder

        with _quiet_hf():
            try:
                self.model = CrossEncoder(str(self.path), device="cpu")
            except (OSError, ValueError) as exc:
                raise PosttrainError(f"cannot load reranker from {self.path}: {exc}") from None

    def scores(self, query: str, texts: Sequence[str]) -> np.ndarray:
        """One float32 logit per text."""
        return _logits(self.model, [(query, t) for t in texts], self.batch_size)

    def rerank(
        self, query: str, items: Sequence[T], text_of: Callable[[T], str], top_k: int | None = None
    ) -> list[tuple[T, float]]:
        """The ``top_k`` items (all when None) with their scores, best first; ties keep input order."""
        return rerank_items(self.scores, query, items, text_of, top_k)


def rerank_items(
    scores: Callable[[str, Sequence[str]], Sequence[float]],
    query: str,
    items: Sequence[T],
    text_of: Callable[[T], str],
    top_k: int | None,
) -> list[tuple[T, float]]:
    """Score each item's text against ``query`` and order them (any reranker's ``rerank``)."""
    if not items or (top_k is not None and top_k <= 0):
        return []
    return order_by_scores(items, scores(query, [text_of(item) for item in items]), top_k)


def order_by_scores(items: Sequence[T], scores: Sequence[float], top_k: int | None) -> list[tuple[T, float]]:
    """(item, score) best first, the first ``top_k`` (all when None); ties keep input order."""
    order = sorted(range(len(items)), key=lambda i: -float(scores[i]))
    return [(items[i], float(scores[i])) for i in order[:top_k]]


@lru_cache(maxsize=4)
def _cached_reranker(path: str) -> Reranker:
    return Reranker(path)


def get_reranker(path: str | Path) -> Reranker:
    """A process-wide cached :class:`Reranker` per (resolved) directory."""
    return _cached_reranker(str(Path(path).expanduser().resolve()))


def evaluate_pairs(
    model_or_path: CrossEncoder | Reranker | str | Path, pairs: Sequence[TrainPair], batch_size: int = 32
) -> dict[str, float]:
    """Rank each query's candidates; ``{"mrr", "accuracy@1", "queries"}`` of the positive's rank.

    Queries are grouped by ``(group, query)``. Ties count against the positive (a model that
    scores everything alike gets the worst rank), so an untrained head cannot look good by luck
    of ordering. Queries without a positive or without negatives are skipped.
    """
    if isinstance(model_or_path, (str, Path)):
        model = Reranker(model_or_path, batch_size=batch_size).model
    elif isinstance(model_or_path, Reranker):
        model = model_or_path.model
    else:
        model = model_or_path
    logits = _logits(model, [(p.query, p.passage) for p in pairs], batch_size)
    by_query: dict[tuple[str, str], list[int]] = {}
    for i, pair in enumerate(pairs):
        by_query.setdefault((pair.group, pair.query), []).append(i)
    reciprocal: list[float] = []
    hits: list[float] = []
    for members in by_query.values():
        positives = [i for i in members if pairs[i].label >= 0.5]
        negatives = [i for i in members if pairs[i].label < 0.5]
        if not positives or not negatives:
            continue
        best = max(logits[i] for i in positives)
        rank = 1 + sum(1 for i in negatives if logits[i] >= best)
        reciprocal.append(1.0 / rank)
        hits.append(1.0 if rank == 1 else 0.0)
    if not reciprocal:
        return {"mrr": 0.0, "accuracy@1": 0.0, "queries": 0}
    return {"mrr": float(np.mean(reciprocal)), "accuracy@1": float(np.mean(hits)), "queries": len(reciprocal)}
