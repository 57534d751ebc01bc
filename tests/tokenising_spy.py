"""`tokenised`: a spy on the default rows' tokenisation, for tests that a refusal comes before any text is tokenised.

A module uses it as `tokenised = tokenising_spy.tokenised` (a fixture under its name: imported by name, a test's
argument of that name would redefine the import, ruff F811)."""

import pytest

from easytrain.trainers import lm_blocks


@pytest.fixture
def tokenised(monkeypatch) -> list:
    """Every call of the default rows' tokenisation, recorded and made to fail: a refusal must come before the
    first, and a run that is not refused stops there, with 'tokenised before' in the error."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(args)
        raise AssertionError("the text was tokenised before the refusal")

    monkeypatch.setattr(lm_blocks, "tokenize_and_group", spy)
    return calls
