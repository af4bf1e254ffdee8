"""Retrieval-augmented generation: parse documents, chunk, embed, store and search.

The pieces, one module each, in pipeline order:

- :mod:`components.rag.parsing`   files and folders -> unstructured elements (or a skip reason)
- :mod:`components.rag.chunking`  elements -> :class:`~components.rag.chunking.Chunk` (stable ids)
- :mod:`components.rag.embedding` MiniLM (or a local sentence-transformers path) -> unit vectors
- :mod:`components.rag.store`     a Milvus collection: dense + BM25 sparse fields, three search modes
- :mod:`components.rag.index`     the two verbs built from them: :func:`ingest` and :func:`retrieve`

This package file imports nothing heavy, so ``import components.rag`` (and the CLI's ``--help``)
stays fast; import the submodule you need.
"""
