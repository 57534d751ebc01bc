"""The ``labels`` and ``attention_mask`` columns of pre-tokenized language-model rows, as transformers reads them.

transformers' causal-LM loss shifts ``labels`` itself: the logits at position t are scored against
``labels[t + 1]``, and a label of -100 is not scored. easytrain's blocks predict the next input token
(``targets = input_ids[1:]``), so here a label is a loss mask: the target ``input_ids[t + 1]`` is supervised
exactly when ``labels[t + 1]`` is not -100. A label that is neither -100 nor the input id at its position
(labels shifted by hand, or other targets than the next token) is refused, never trained on silently.

Zeros of ``attention_mask`` mark padding, which transformers neither attends to nor, with -100 labels, scores.
A leading and/or trailing run of them is dropped: the row's real tokens move to its front and the freed slots
trail them as padding, unsupervised and unattended (easytrain pads its blocks itself). With rotary positions the
real tokens then score as transformers scores them, left padding included (attention sees only position
differences). Padding between real tokens, or a mask value other than 0 or 1, is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from easytrain.data.errors import DataError

LABELS = "labels"
ATTENTION_MASK = "attention_mask"
#: The columns of transformers' causal-LM rows besides ``input_ids`` that change what is trained.
MASK_COLUMNS = (LABELS, ATTENTION_MASK)
#: transformers' label of a token that is not scored.
IGNORE_INDEX = -100


class HonouredRows(NamedTuple):
    """Rows ``[N, L]`` with each one's real tokens first, then its padding (both masks boolean)."""

    tokens_NL: np.ndarray
    real_NL: np.ndarray  # a real token, not padding
    supervised_NL: np.ndarray  # real and not labelled -100: a target of the loss wherever a token precedes it


def honour_masks(tokens_NL: Any, labels_NL: Any = None, mask_NL: Any = None, *, row_names: Sequence[int],
                 rows_are: str) -> HonouredRows:
    """Check the rows' ``labels``/``attention_mask`` (None: absent) with `check_masks`, and apply them."""
    tokens_NL = _matrix(tokens_NL, "input_ids", None, rows_are)
    real_NL, supervised_NL = check_masks(tokens_NL, labels_NL, mask_NL, row_names=row_names, rows_are=rows_are)
    if mask_NL is None:
        return HonouredRows(tokens_NL, real_NL, supervised_NL)
    order_NL = _real_first_order(real_NL)
    rolled = [np.take_along_axis(values, order_NL, axis=1) for values in (tokens_NL, real_NL, supervised_NL)]
    return HonouredRows(*rolled)


def check_masks(tokens_NL: Any, labels_NL: Any = None, mask_NL: Any = None, *, row_names: Sequence[int],
                rows_are: str) -> tuple[np.ndarray, np.ndarray]:
    """The real and the supervised tokens ``[N, L]`` (booleans, in the rows' own order) of rows whose ``labels``
    and ``attention_mask`` (None: absent) easytrain can train on; ``row_names[i]`` names row i in errors,
    ``rows_are`` says whose rows they are ("Pre-tokenized rows of the 'train' split").

    Raises:
        DataError: naming the row, column and position of a label other than -100 or the input id there, a mask
            value other than 0 or 1, padding between real tokens, or a column of another shape than ``input_ids``.
    """
    tokens_NL = _matrix(tokens_NL, "input_ids", None, rows_are)
    real_NL = np.ones(tokens_NL.shape, bool)
    if mask_NL is not None:
        real_NL = _checked_mask(_matrix(mask_NL, ATTENTION_MASK, tokens_NL.shape, rows_are), row_names, rows_are)
    if labels_NL is None:
        return real_NL, real_NL
    labels_NL = _matrix(labels_NL, LABELS, tokens_NL.shape, rows_are)
    labelled_NL = labels_NL != IGNORE_INDEX
    _check_labels(tokens_NL, labels_NL, real_NL & labelled_NL, row_names, rows_are)
    return real_NL, real_NL & labelled_NL


def _matrix(values: Any, column: str, shape: tuple[int, ...] | None, rows_are: str) -> np.ndarray:
    """``values`` as a 2-D array, of ``shape`` when given (the ``input_ids`` rows it belongs to)."""
    array = np.asarray(values)
    if array.ndim != 2 or array.dtype == object or (shape is not None and array.shape != shape):
        expected = "[rows, tokens]" if shape is None else f"the shape of 'input_ids' {tuple(shape)}"
        raise DataError(f"{rows_are}: column {column!r} is not one equal-length list per row (got shape "
                        f"{array.shape}, {array.dtype}); it must have {expected}.")
    return array


def _checked_mask(mask_NL: np.ndarray, row_names: Sequence[int], rows_are: str) -> np.ndarray:
    """The real tokens (mask 1) of rows whose zeros are only a leading and/or trailing run."""
    other_N = ((mask_NL != 0) & (mask_NL != 1)).any(axis=1)
    if other_N.any():
        row = int(np.flatnonzero(other_N)[0])
        position = int(np.flatnonzero((mask_NL[row] != 0) & (mask_NL[row] != 1))[0])
        raise DataError(f"{rows_are}: row {row_names[row]}, column {ATTENTION_MASK!r}, position {position} holds "
                        f"{mask_NL[row, position].item()!r}; an attention mask holds only 0 or 1 (0: padding, "
                        "1: a real token).")
    real_NL = mask_NL == 1
    count_N = real_NL.sum(axis=1)
    first_N = np.argmax(real_NL, axis=1)
    last_N = real_NL.shape[1] - 1 - np.argmax(real_NL[:, ::-1], axis=1)
    inner_N = (count_N > 0) & (last_N - first_N + 1 != count_N)
    if inner_N.any():
        row = int(np.flatnonzero(inner_N)[0])
        position = int(first_N[row] + np.argmin(real_NL[row, first_N[row]:]))
        raise DataError(f"{rows_are}: row {row_names[row]}, column {ATTENTION_MASK!r} marks position {position} as "
                        "padding between real tokens; only padding at a row's start or end is dropped (easytrain "
                        "pads its blocks itself), so remove the padding inside such rows or drop them.")
    return real_NL


def _check_labels(tokens_NL: np.ndarray, labels_NL: np.ndarray, checked_NL: np.ndarray, row_names: Sequence[int],
                  rows_are: str) -> None:
    """Every label of a real token is -100 or that token (``checked_NL``: the real tokens not labelled -100): a
    loss mask, the only reading next-token blocks allow."""
    wrong_NL = checked_NL & (labels_NL != tokens_NL)
    if not wrong_NL.any():
        return
    row = int(np.flatnonzero(wrong_NL.any(axis=1))[0])
    position = int(np.flatnonzero(wrong_NL[row])[0])
    labelled = checked_NL[row, :-1]
    shifted = labelled.any() and bool((labels_NL[row, :-1][labelled] == tokens_NL[row, 1:][labelled]).all())
    why = (" These labels are the input ids shifted left by one: transformers and easytrain shift them themselves, so "
           "pass them unshifted." if shifted else "")
    raise DataError(f"{rows_are}: row {row_names[row]}, column {LABELS!r}, position {position} holds "
                    f"{labels_NL[row, position].item()}, which is neither -100 nor the input id there "
                    f"({tokens_NL[row, position].item()}).{why} easytrain trains each token to predict the next input "
                    f"token, so a label can only say whether its token is supervised: set it to the input id at its "
                    f"position or to -100 (not supervised).")


def _real_first_order(real_NL: np.ndarray) -> np.ndarray:
    """Per row, the positions that put its one run of real tokens first and its padding after, in order."""
    length = real_NL.shape[1]
    leading_N = np.where(real_NL.any(axis=1), np.argmax(real_NL, axis=1), 0)
    return (np.arange(length)[None, :] + leading_N[:, None]) % length
