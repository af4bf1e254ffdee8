"""Errors a user can act on. The CLI and stage commands print them as one line, no traceback."""


class PosttrainError(Exception):
    """Base class: bad input, a missing file, a locked resource. Message is shown as is."""


class DataError(PosttrainError):
    """Malformed input data; the message names the file and line."""


class MissingInputError(PosttrainError):
    """A required input file or directory does not exist."""
