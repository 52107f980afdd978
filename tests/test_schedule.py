"""The refresh schedule: fixed gap, lazy doubling capped at 8T, staggered first refresh."""

import pytest

from hf_galore.schedule import LAZY_MAX_FACTOR, RefreshSchedule, schedule_after_refresh, stagger_offsets


def test_stagger_offsets_spread_evenly_over_one_interval():
    assert stagger_offsets(4, 200) == [0, 50, 100, 150]
    assert stagger_offsets(3, 2) == [0, 0, 1]


def test_fixed_gap_without_lazy_refresh():
    schedule = schedule_after_refresh(10, update_proj_gap=5, previous_interval=40, overlap=0.99, lazy_threshold=0)
    assert schedule == RefreshSchedule(interval=5, next_refresh=15)


def test_lazy_refresh_doubles_while_the_subspace_stays_and_caps_at_8t():
    interval, clock, seen = None, 0, []
    for _ in range(6):
        interval, clock = schedule_after_refresh(
            clock, update_proj_gap=3, previous_interval=interval, overlap=0.9, lazy_threshold=0.5
        )
        seen.append(interval)
    assert seen == [6, 12, 24, 24, 24, 24] and LAZY_MAX_FACTOR * 3 == 24
    assert clock == 6 + 12 + 24 * 4


@pytest.mark.parametrize("overlap", [0.49, None], ids=["moved", "unmeasured"])
def test_lazy_refresh_falls_back_to_the_gap_when_the_subspace_moves(overlap):
    schedule = schedule_after_refresh(30, update_proj_gap=3, previous_interval=24, overlap=overlap, lazy_threshold=0.5)
    assert schedule == RefreshSchedule(interval=3, next_refresh=33)


def test_stagger_offset_shortens_only_the_first_delay():
    assert schedule_after_refresh(
        0, update_proj_gap=8, previous_interval=None, overlap=None, lazy_threshold=0, stagger_offset=3
    ) == RefreshSchedule(interval=8, next_refresh=3)
    # target 0's offset is 0: it keeps the full gap rather than refreshing again at once
    assert (
        schedule_after_refresh(
            0, update_proj_gap=8, previous_interval=None, overlap=None, lazy_threshold=0, stagger_offset=0
        ).next_refresh
        == 8
    )
