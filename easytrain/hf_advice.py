"""Keeps one line of `transformers`' import-time advice off easytrain's output.

Imported without PyTorch (easytrain's runtime install has none), `transformers` logs "PyTorch was not found.
Models won't be available ..." on import, up to twice. Models come from easytrain, not from `transformers`
(whose tokenizers, configs and file utilities are what easytrain uses), so the line would only mislead.
The filter drops exactly that record, on the logger that emits it; every other warning still shows.
"""

from __future__ import annotations

import logging

ADVICE = "PyTorch was not found"


class _WithoutPyTorchAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(ADVICE)


def hide_pytorch_advice() -> None:
    """Install the filter (idempotent); it works for imports of `transformers` that come after it."""
    logger = logging.getLogger("transformers")
    if not any(isinstance(f, _WithoutPyTorchAdvice) for f in logger.filters):
        logger.addFilter(_WithoutPyTorchAdvice())
