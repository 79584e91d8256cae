"""Keep the calling thread's alternate signal stack across a native call that replaces it.

OpenVINO's CPU plugin (2026.4) installs its own alternate signal stack (``sigaltstack``, 20 KB of
mmap'd memory) on the thread that compiles a model, and restores the previous one only when that
compiled model is destroyed. Two compiled models destroyed in the order they were made (``auto``
compiles ``openvino`` and ``openvino-int8``; NNCF compiles while it calibrates) leave the thread
pointing at a stack that has been unmapped. Python installs its signal handlers with
``SA_ONSTACK``, so the next Ctrl-C or SIGTERM is delivered onto freed memory and the process dies
with SIGSEGV (exit 139) instead of exiting 130/143 with its temp dirs removed (reproduced:
``tests/test_backends.py::test_openvino_compiles_leave_ctrl_c_working``).

Restoring the caller's stack right after the call makes every later save/restore inside the plugin
see the caller's stack, so nothing ever points at the plugin's memory once it is gone. Linux only
(the ``sigaltstack`` call through libc); elsewhere the guard does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys
from collections.abc import Iterator


class _StackT(ctypes.Structure):
    """``stack_t`` (``man sigaltstack``): the base, the flags, the size."""

    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def current() -> tuple[int, int, int] | None:
    """(base, flags, size) of this thread's alternate signal stack; None where it cannot be read."""
    libc = _libc()
    st = _StackT()
    if libc is None or libc.sigaltstack(None, ctypes.byref(st)) != 0:
        return None
    return st.ss_sp or 0, st.ss_flags, st.ss_size


@contextlib.contextmanager
def kept() -> Iterator[None]:
    """Run the body, then put back the alternate signal stack this thread had before it."""
    libc = _libc()
    before = _StackT()
    if libc is None or libc.sigaltstack(None, ctypes.byref(before)) != 0:
        yield
        return
    try:
        yield
    finally:
        if before.ss_flags & 2:  # SS_DISABLE: there was none; disabling needs no base or size
            before.ss_sp, before.ss_size = None, 0
        libc.sigaltstack(ctypes.byref(before), None)
