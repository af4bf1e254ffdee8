"""Retrieval-augmented generation: parse, clean, chunk, embed, store, search, rerank, answer, evaluate.

The pieces, one module each, in pipeline order:

- :mod:`components.rag.parsing`    files and folders -> unstructured elements (or a skip reason);
  hidden HTML text is quarantined before parsing
- :mod:`components.rag.cleaning`   whitespace, navigation boilerplate, running headers; MinHash dedupe
- :mod:`components.rag.chunking`   elements -> :class:`~components.rag.chunking.Chunk` (by_title, fixed,
  sentence_window; sizes in embedding-model tokens; stable ids, title/section/page)
- :mod:`components.rag.embedding`  MiniLM (or a local sentence-transformers path) -> unit vectors
- :mod:`components.rag.store`      a Milvus collection: dense + BM25 sparse + metadata fields, filters
- :mod:`components.rag.index`      the two verbs: incremental :func:`ingest` and :func:`retrieve`
- :mod:`components.rag.rerank`     a cross-encoder trained on the corpus itself (BM25 hard negatives)
- :mod:`components.rag.guard`      prompt-injection defence: instruction-like sentences, hidden HTML
- :mod:`components.rag.answer`     extractive and generative answers with citations and refusals
- :mod:`components.rag.evaluation` question sets and file-level recall/MRR/nDCG
- :mod:`components.rag.service`    config -> retrieval options, reranker, answers, evaluation

This package file imports nothing heavy, so ``import components.rag`` (and the CLI's ``--help``)
stays fast; import the submodule you need.
"""
