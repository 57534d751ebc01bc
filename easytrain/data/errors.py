"""The one exception type the data pipeline raises for bad inputs or settings."""

from __future__ import annotations

from easytrain.errors import EasytrainError


class DataError(EasytrainError, ValueError):
    """A data source, tokenizer or loader setting cannot work as given.

    Messages name the offending argument and say how to fix it, so the error
    can be shown to a user as-is.
    """
