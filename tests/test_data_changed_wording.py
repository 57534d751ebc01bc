"""A resume whose training rows hash differently with the same row count is refused, and the refusal names both
causes: the examples were edited, or the same examples tokenise differently (another tokenizer or chat template, or
an easytrain version that tokenises prompt and completion otherwise), so a user whose data did not change is not
sent looking for an edit that never happened."""

import pytest

from easytrain import ArgumentError
from easytrain.trainers.resume_checks import check_data_position

SAVED = {"step": 2, "seed": 0, "global_batch_size": 4, "num_rows": 12, "data_digest": "aaaa"}


def test_a_changed_digest_names_edited_rows_and_another_tokenisation():
    now = {"seed": 0, "global_batch_size": 4, "num_rows": 12, "data_digest": "bbbb"}
    with pytest.raises(ArgumentError) as raised:
        check_data_position(SAVED, now, allow=False)
    message = str(raised.value)
    assert "edited examples" in message and "tokenise differently" in message
    assert "another tokenizer or chat template" in message and "tokenises prompt and completion" in message
    assert "--allow_data_order_change" in message


def test_a_changed_row_count_does_not_blame_the_tokenisation():
    now = {"seed": 0, "global_batch_size": 4, "num_rows": 13, "data_digest": "bbbb"}
    with pytest.raises(ArgumentError) as raised:
        check_data_position(SAVED, now, allow=False)
    assert "tokenise differently" not in str(raised.value) and "files or the dataset version" in str(raised.value)
