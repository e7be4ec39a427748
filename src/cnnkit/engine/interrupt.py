"""Ctrl-C and SIGTERM end training cleanly: finish the current step, save, exit with a hint.

While a ``StopRequest`` is installed, the first SIGINT/SIGTERM only sets a flag that the loop
reads at each step boundary; ``fit`` then saves a checkpoint (mid-epoch, exactly resumable) and
raises ``Interrupted``.
A second signal interrupts at once (KeyboardInterrupt), for when saving itself hangs. Handlers are
installed only in the main thread (Python allows no other) and restored on exit.
"""

from __future__ import annotations

import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Training stopped on a signal after saving a checkpoint; ``exit_code`` is 128 + signal."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum, self.exit_code = signum, 128 + signum


class StopRequest:
    """A callable flag (True once a stop signal arrived) and the context that installs it."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict = {}

    def __call__(self) -> bool:
        return self.signum is not None

    def install(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        """Put back the handlers that were there before ``install``."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> StopRequest:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt  # second signal: stop now, without saving
        self.signum = signum
        name = signal.Signals(signum).name
        print(
            f"\n{name}: stopping after the current step and saving a checkpoint "
            "(send it again to abort without saving)",
            file=sys.stderr,
            flush=True,
        )
