"""``gac.startup.quiet_gc``: no cyclic collection while a process imports its stack, and what it built frozen."""

from __future__ import annotations

import gc

from gac.startup import quiet_gc


def test_nothing_is_collected_inside_and_what_the_block_built_is_frozen() -> None:
    started: list[int] = []

    def seen(phase: str, info: dict) -> None:
        if phase == "start":
            started.append(info["generation"])

    frozen = gc.get_freeze_count()
    gc.callbacks.append(seen)
    try:
        with quiet_gc():
            assert not gc.isenabled()
            built = [[i] for i in range(100_000)]  # 100k containers: ~140 collections with the collector on
        assert started == [] and gc.isenabled()
        assert gc.get_freeze_count() >= frozen + len(built)  # later full collections skip them
        more = [[i] for i in range(100_000)]  # after the block the collector runs as before
        assert started and len(more) == len(built)
    finally:
        gc.callbacks.remove(seen)


def test_it_nests_and_leaves_a_disabled_collector_disabled() -> None:
    with quiet_gc():
        with quiet_gc():
            pass
        assert not gc.isenabled()  # the inner block does not switch it back on early
    assert gc.isenabled()
    gc.disable()
    try:
        with quiet_gc():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
