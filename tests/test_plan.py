import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchfit.plan import plan_global_batch


def test_without_target():
    plan = plan_global_batch(96, world_size=4)
    assert (plan.per_device, plan.accumulation, plan.global_batch) == (96, 1, 384)


def test_target_reached_exactly():
    plan = plan_global_batch(96, world_size=2, target_global_batch=1024)
    assert plan.per_device * plan.world_size * plan.accumulation == 1024
    assert plan.per_device <= 96 and plan.accumulation == 8  # 512 per rank: 6 and 7 do not divide it


@given(st.integers(1, 4096), st.integers(1, 16), st.integers(1, 2**16))
def test_plan_properties(per_device_max, world, units):
    target = units * world
    plan = plan_global_batch(per_device_max, world, target)
    assert plan.per_device * world * plan.accumulation == target
    assert 1 <= plan.per_device <= per_device_max
    # No smaller accumulation reaches the target with a per-device batch that fits.
    per_rank = target // world
    assert all(per_rank % a or per_rank // a > per_device_max for a in range(1, plan.accumulation))


def test_target_must_split_over_ranks():
    with pytest.raises(ValueError, match="multiple of the world size 3"):
        plan_global_batch(64, world_size=3, target_global_batch=1000)
