"""Mesh size errors say what the user gave: a data axis left at -1 is not shown as the 1 it was resolved to, and an
axis larger than the devices is said to need more devices than there are."""

import pytest

from easytrain import ArgumentError
from easytrain.sharding import resolve_mesh_shape


def test_a_data_axis_left_at_minus_one_is_not_shown_as_one():
    with pytest.raises(ArgumentError) as caught:
        resolve_mesh_shape({"data": -1, "fsdp": -1, "tensor": 3}, 8)
    assert caught.value.field == "tensor_parallel_size"
    assert "data_parallel_size" not in caught.value.message
    assert "8 devices are not divisible by tensor_parallel_size=3" in caught.value.message


def test_an_axis_larger_than_the_devices_says_it_needs_more_devices():
    with pytest.raises(ArgumentError) as caught:
        resolve_mesh_shape({"data": -1, "fsdp": 1, "tensor": 16}, 8)
    assert caught.value.field == "tensor_parallel_size"
    assert "tensor_parallel_size=16 needs 16 devices, but 8 are available" in caught.value.message
    assert "not divisible" not in caught.value.message and "fsdp_size" not in caught.value.message


def test_every_size_the_user_gave_above_one_is_shown():
    with pytest.raises(ArgumentError) as caught:
        resolve_mesh_shape({"data": -1, "fsdp": 3, "tensor": 2}, 8)
    assert caught.value.field == "fsdp_size"
    assert "8 devices are not divisible by fsdp_size=3 * tensor_parallel_size=2 = 6" in caught.value.message
