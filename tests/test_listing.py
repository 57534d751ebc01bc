"""`listed`: the few names a message shows, and the count of the rest."""

import pytest

from easytrain.listing import listed


@pytest.mark.parametrize("names, limit, sep, expected", [
    ([], 3, ", ", ""),
    (["a"], 3, ", ", "a"),
    (["a", "b", "c"], 3, ", ", "a, b, c"),
    (["a", "b", "c", "d"], 3, ", ", "a, b, c, and 1 more"),
    ([f"n{i}" for i in range(10)], 2, ", ", "n0, n1, and 8 more"),
    (["x: 1 vs 2", "y: 3 vs 4", "z: 5 vs 6"], 1, "; ", "x: 1 vs 2; and 2 more"),
])
def test_listed_shows_the_first_names_and_counts_the_rest(names, limit, sep, expected):
    assert listed(names, limit, sep) == expected


def test_listed_reads_an_iterable_once():
    assert listed((name for name in "abcde"), 2) == "a, b, and 3 more"
