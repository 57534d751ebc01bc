"""The one exception type the data pipeline raises for bad inputs or settings."""

from __future__ import annotations

from easytrain.errors import EasytrainError


class DataError(EasytrainError, ValueError):
    """A data source, tokenizer or loader setting cannot work as given.

    Messages name the offending argument and say how to fix it, so the error
    can be shown to a user as-is.
    """


class NotEnoughTokensError(DataError):
    """A split holds fewer tokens than one block: callers that know which split it is add that and its fixes."""

    def __init__(self, message: str, *, num_tokens: int = 0, block_size: int = 0) -> None:
        super().__init__(message)
        self.num_tokens, self.block_size = num_tokens, block_size


def error_reason(error: BaseException, innermost: bool = True) -> str:
    """The first line of ``error``, or of the innermost error it chains (``DatasetGenerationError`` says only
    that generation failed)."""
    while innermost and (error.__cause__ is not None or error.__context__ is not None):
        error = error.__cause__ or error.__context__
    text = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
