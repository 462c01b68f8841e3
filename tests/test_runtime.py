"""The process-level helpers in bgee_dask._runtime."""

from .fresh_python import python_json


def test_map_on_keeps_order_with_and_without_a_pool():
    from concurrent.futures import ThreadPoolExecutor

    from bgee_dask._runtime import map_on

    items = list(range(50))
    with ThreadPoolExecutor(3) as pool:
        assert map_on(pool, lambda x: x * x, items) == [x * x for x in items]
        assert map_on(pool, str, [7]) == ["7"]
    assert map_on(None, lambda x: -x, items) == [-x for x in items]
    assert map_on(None, str, []) == []


_STREAM_WATCH = """
import json, sys, types
import numba.core.errors  # numba first, as anndata and scanpy import it
if {with_bgee}:
    from bgee_dask import _jit  # noqa: F401
assigned = []

class Watched(types.ModuleType):
    def __setattr__(self, name, value):
        if name in ("stdout", "stderr"):
            assigned.append(name)
        super().__setattr__(name, value)

sys.__class__ = Watched
try:
    numba.njit(lambda x: x + "a")(1)  # fails typing: numba formats its message
    message = None
except numba.core.errors.TypingError as exc:
    message = str(exc)
sys.__class__ = types.ModuleType
try:
    import colorama  # noqa: F401
    colorama_present = True
except ImportError:
    colorama_present = False
print(json.dumps({{"assigned": len(assigned), "message": message, "colorama": colorama_present}}))
"""


def test_numba_error_messages_leave_sys_stdout_and_stderr_alone():
    """After our kernels' import, numba no longer assigns the streams while it formats an error.

    Without it (the reference run: numba alone), each message made with colorama installed
    assigns ``sys.stdout`` and ``sys.stderr`` back to what colorama saved, which undoes any
    redirection another thread made meanwhile (see ``bgee_dask._jit``).
    """
    numba_alone = python_json(_STREAM_WATCH.format(with_bgee=False))
    ours = python_json(_STREAM_WATCH.format(with_bgee=True))
    assert ours["assigned"] == 0
    assert ours["message"] is not None and "No implementation of function" in ours["message"]
    assert ours["message"] == numba_alone["message"]  # the same text, escape codes included
    if numba_alone["colorama"]:  # the hazard is real here: the watcher sees numba's assignments
        assert numba_alone["assigned"] > 0
