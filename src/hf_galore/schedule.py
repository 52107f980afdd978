"""When each GaLore target refreshes its basis: a pure function of the clock and the group's policy.

Kept apart from the optimizer so the policy (fixed gap, lazy doubling, staggered start) is tested on its own and
the optimizer only stores its two plain ints (`next_refresh`, `refresh_interval`).
"""

from __future__ import annotations

from typing import NamedTuple

LAZY_MAX_FACTOR = 8  # lazy refresh stretches the interval up to this many times update_proj_gap


class RefreshSchedule(NamedTuple):
    interval: int  # the interval this refresh chose (doubles lazily)
    next_refresh: int  # the clock value at which the next refresh is due


def stagger_offsets(count: int, update_proj_gap: int) -> list[int]:
    """First-refresh delays that spread `count` targets evenly over one interval (target i: ⌊i·T/count⌋ steps).

    Every target still gets its basis on its first step; after that target i refreshes at steps offset_i + k·T,
    so no single step pays for every SVD.
    """
    return [(i * update_proj_gap) // count for i in range(count)]


def schedule_after_refresh(
    clock: int,
    *,
    update_proj_gap: int,
    previous_interval: int | None,
    overlap: float | None,
    lazy_threshold: float,
    stagger_offset: int | None = None,
) -> RefreshSchedule:
    """The schedule after a refresh at `clock`.

    The interval is `update_proj_gap`; lazily (`lazy_threshold` > 0) it doubles, up to LAZY_MAX_FACTOR times the
    gap, while the new basis overlaps the old one by at least the threshold, and falls back to the gap when the
    subspace moves (or no overlap could be measured). `stagger_offset` (a target's first refresh only) shortens
    the first delay to that offset; an offset of 0 keeps the full gap.
    """
    interval = update_proj_gap
    if lazy_threshold > 0 and overlap is not None and overlap >= lazy_threshold:
        interval = min(2 * (previous_interval or update_proj_gap), LAZY_MAX_FACTOR * update_proj_gap)
    delay = stagger_offset or interval
    return RefreshSchedule(interval=interval, next_refresh=clock + delay)
