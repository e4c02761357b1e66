"""The batch driver's helpers outside the reference comparison: the order check with a kept scratch
array, and the huge-page state allocation."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from twin.core.fleet import _HUGE_PAGE, _state_zeros
from twin.core.kernels import EARLIEST, batch_is_ordered, batch_is_ordered_into


def _ordered(device: list[int], t_us: list[int], n_devices: int) -> bool:
    last: dict[int, int] = {}
    for d, t in zip(device, t_us, strict=True):
        if 0 <= d < n_devices:
            if t < last.get(d, EARLIEST):
                return False
            last[d] = t
    return True


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(-2, 5), st.integers(-3, 6)), max_size=60),
    st.integers(0, 5),
    st.booleans(),
)
def test_order_check_with_scratch(samples: list[tuple[int, int]], n_devices: int, runs: bool) -> None:
    if runs:  # messages: runs of one device
        samples = sorted(samples, key=lambda s: s[0])
    device = np.array([s[0] for s in samples], dtype=np.int32)
    t_us = np.array([s[1] for s in samples], dtype=np.int64)
    want = _ordered(device.tolist(), t_us.tolist(), n_devices)
    assert batch_is_ordered(device, t_us, n_devices) is want
    # a kept scratch: what earlier batches (generations) left in it does not count
    scratch = np.zeros((n_devices, 2), dtype=np.int64)
    for generation in (1, 2):
        assert batch_is_ordered_into(device, t_us, scratch, generation) is want
    scratch[:, 1] = np.iinfo(np.int64).max  # newest times of an old generation, far in the future
    assert batch_is_ordered_into(device, t_us, scratch, 3) is want


def test_state_arrays_zeroed_aligned_writable() -> None:
    for shape in [(3, 5), (_HUGE_PAGE // 64 + 7, 8)]:
        a = _state_zeros(shape, np.float64)
        assert a.shape == shape and a.dtype == np.float64 and a.flags.c_contiguous and a.flags.writeable
        assert a.ctypes.data % 64 == 0
        assert not a.any()
        a[-1, -1] = 1.0
        assert a.sum() == 1.0
