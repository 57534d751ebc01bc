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


#: What Orbax writes between two nodes that differ (`format_tree_diff`).
NODE_GAP = "\n\n"


def test_the_checkpoint_refusals_indent_each_shown_line_and_count_the_rest_beneath():
    """Orbax's comparison keeps its own indentation under the refusal's, its blank lines and partial_restore hint are
    dropped, and the count of the nodes left out (not of Orbax's lines: three a node) follows the last one shown,
    then the fix."""
    from pathlib import Path

    from easytrain.checkpoint_signatures import CheckpointMismatchError, CheckpointStructureError

    nodes = [f"opt_state.{i}:\n    - Source: (<class 'list'>, 3)\n    - Target: (<class 'list'>, 2)" for i in range(5)]
    detail = f"tree structures do not match:\n{NODE_GAP.join(nodes)}\nIf intentional, pass `partial_restore=True`."
    lines = str(CheckpointStructureError(Path("run/checkpoints/4"), detail)).splitlines()
    shown = [f"  {line}" for node in nodes[:4] for line in node.splitlines()]
    assert lines[1:-1] == shown + ["  and 1 more"], lines
    assert "--init_weights_from run/checkpoints/4" in lines[-1], lines
    lines = str(CheckpointMismatchError([f"k{i}" for i in range(10)], [], {"w": ("f32[2]", "bf16[2]")})).splitlines()
    assert lines[1:] == [f"  missing in checkpoint: k{i}" for i in range(8)] + [
        "  and 2 more", "  w: stored f32[2], expected bf16[2]"], lines
