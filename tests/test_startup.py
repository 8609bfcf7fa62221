"""``gac.startup.quiet_gc``: no cyclic collection while a process imports its stack, and what it built frozen."""

from __future__ import annotations

import gc
import importlib
import sys
from pathlib import Path

from gac.startup import quiet_gc

#: A module whose import builds 100k containers (~140 collections with the collector on), like a heavy package does.
HEAVY = "BUILT = [[i] for i in range(100_000)]\n"


def test_nothing_is_collected_inside_and_what_the_imports_built_is_frozen(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "gac_startup_heavy.py").write_text(HEAVY)
    monkeypatch.syspath_prepend(str(tmp_path))
    started: list[int] = []

    def seen(phase: str, info: dict) -> None:
        if phase == "start":
            started.append(info["generation"])

    frozen = gc.get_freeze_count()
    gc.callbacks.append(seen)
    try:
        with quiet_gc():
            assert not gc.isenabled()
            heavy = importlib.import_module("gac_startup_heavy")
        assert started == [] and gc.isenabled()
        assert gc.get_freeze_count() >= frozen + len(heavy.BUILT)  # later full collections skip them
        more = [[i] for i in range(100_000)]  # after the block the collector runs as before
        assert started and len(more) == len(heavy.BUILT)
    finally:
        gc.callbacks.remove(seen)
        sys.modules.pop("gac_startup_heavy", None)


def test_a_block_that_imports_nothing_freezes_nothing() -> None:
    """``gac.cli.main`` called again in one process: what is alive then (garbage cycles too) is not pinned for good."""
    frozen = gc.get_freeze_count()
    with quiet_gc():
        alive = [[i] for i in range(10_000)]
    # at most as many: a frozen object freed meanwhile (another thread, e.g. inductor's compile workers left by an
    # earlier test, drops its last reference) lowers the count; a freeze would raise it by the 10,000 lists at least
    assert gc.get_freeze_count() <= frozen and len(alive) == 10_000


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
