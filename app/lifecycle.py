"""A script's process around its ``main``: one-line errors and exit codes, Ctrl-C and SIGTERM unwinding,
the warning format, output that cannot be encoded."""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Sequence

from common.allocator import keep_freed_memory
from common.determinism import explain_refusal
from common.errors import ToolkitError


def _format_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


class Terminated(BaseException):
    """SIGTERM, raised in the main process like KeyboardInterrupt on Ctrl-C, so that the run unwinds: records
    written so far are kept, DataLoader workers are shut down, the exit code is 143 (128 + SIGTERM)."""


def _on_sigterm(main_pid: int) -> Callable:
    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        if os.getpid() != main_pid:  # a forked child that inherited the handler: end as SIGTERM does
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise Terminated
    return handler


def _escape_unencodable_output() -> None:
    """A file name that is not valid UTF-8 printed to stdout is escaped instead of ending the run."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            # best effort: a stream that cannot be reconfigured (closed, detached) keeps its own error mode
            with contextlib.suppress(ValueError, OSError):
                reconfigure(errors="backslashreplace")


def run_cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None,
            prog: str = "ucag") -> None:
    """Run a script's ``main``: user errors become one stderr line and exit code 2; Ctrl-C exits 130 and
    SIGTERM 143, both after unwinding (records kept, worker processes shut down)."""
    warnings.formatwarning = _format_warning
    _escape_unencodable_output()
    keep_freed_memory()  # CPU batches reuse freed buffers instead of faulting them in again (common.allocator)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm(os.getpid())) if in_main_thread else None
    try:
        code = main(argv)
    except ToolkitError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as exc:  # --deterministic met an op without a deterministic kernel
        refusal = explain_refusal(exc)
        if refusal is None:
            raise
        print(f"{prog}: error: {refusal}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    except Terminated:
        print(f"{prog}: terminated", file=sys.stderr)
        sys.exit(143)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    sys.exit(code or 0)
