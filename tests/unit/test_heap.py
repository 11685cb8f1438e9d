"""freeze_startup_heap: start-up's garbage collected, what stays alive moved out of the collector's sight (the
conftest unfreezes around every test)."""

from __future__ import annotations

import gc
import weakref

import pytest

from service.http.heap import freeze_startup_heap


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def test_live_objects_are_frozen_and_garbage_is_collected_first(caplog: pytest.LogCaptureFixture) -> None:
    gc.disable()  # no automatic collection may free the cycle first: only the freeze's own
    try:
        kept = Node()
        cycle_a, cycle_b = Node(), Node()
        cycle_a.other, cycle_b.other = cycle_b, cycle_a  # garbage only a collection frees
        gone = weakref.ref(cycle_a)
        del cycle_a, cycle_b
        assert gone() is not None
        with caplog.at_level("INFO", logger="service.http.heap"):
            frozen = freeze_startup_heap()
    finally:
        gc.enable()
    assert gone() is None  # collected, not frozen for the process's lifetime
    assert frozen > 0 and gc.get_freeze_count() > 0
    assert f"froze {frozen} start-up objects" in caplog.text
    assert not any(obj is kept for obj in gc.get_objects())  # no generation holds it: no collection walks it
    assert gc.is_tracked(kept)


def test_objects_made_after_the_freeze_are_collected_as_usual() -> None:
    freeze_startup_heap()
    later_a, later_b = Node(), Node()
    later_a.other, later_b.other = later_b, later_a
    gone = weakref.ref(later_a)
    del later_a, later_b
    gc.collect()
    assert gone() is None
