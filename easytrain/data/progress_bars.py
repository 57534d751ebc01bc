"""`--disable_progress_bar` for the data preparation: `datasets` draws its own bars (Generating train split,
Tokenizing, Grouping into blocks, ...), which only its process-wide switch turns off. The switch is thrown for
the preparation only and thrown back after it, so a notebook or script that calls a trainer keeps its bars for
its own `datasets` work; `HF_DATASETS_DISABLE_PROGRESS_BARS`, when set, decides as `datasets` documents."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from datasets import config as datasets_config
from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars


@contextlib.contextmanager
def datasets_progress_bars(disabled: bool) -> Iterator[None]:
    """Within the block, `datasets`' progress bars are off when `disabled` (else left as they are)."""
    switch = disabled and not are_progress_bars_disabled() and datasets_config.HF_DATASETS_DISABLE_PROGRESS_BARS is None
    if switch:
        disable_progress_bars()
    try:
        yield
    finally:
        if switch:
            enable_progress_bars()
