"""The process-level helpers in bgee_dask._runtime."""

import gc
import threading

from bgee_dask._runtime import gc_paused


def test_gc_paused_nests_across_threads_and_restores_the_state():
    assert gc.isenabled()
    inside, release = threading.Event(), threading.Event()

    def other() -> None:
        with gc_paused():
            inside.set()
            release.wait(10)

    t = threading.Thread(target=other)
    with gc_paused():
        assert not gc.isenabled()
        t.start()
        inside.wait(10)
    assert not gc.isenabled()  # the other thread's block is still open
    release.set()
    t.join()
    assert gc.isenabled()
    gc.disable()  # a process that had turned it off keeps it off
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_map_on_keeps_order_with_and_without_a_pool():
    from concurrent.futures import ThreadPoolExecutor

    from bgee_dask._runtime import map_on

    items = list(range(50))
    with ThreadPoolExecutor(3) as pool:
        assert map_on(pool, lambda x: x * x, items) == [x * x for x in items]
        assert map_on(pool, str, [7]) == ["7"]
    assert map_on(None, lambda x: -x, items) == [-x for x in items]
    assert map_on(None, str, []) == []
