"""Stop cleanly on SIGTERM / SIGINT / SIGUSR1 / SIGUSR2: finish the step, save, then leave.

Clusters announce the end of a job with a signal: SLURM's ``--signal`` and submitit's
timeout/preemption signal (USR2 by default), a plain ``kill`` or ``scancel`` (TERM), Ctrl-C (INT).
The handler only raises a flag; the training loop checks it between steps, writes a checkpoint
and then hands the signal on. If somebody installed a Python handler before us (submitit does:
it requeues the job on USR2 and logs TERM), that handler runs next, so requeueing keeps working;
otherwise the run ends with ``Interrupted``.
"""

from __future__ import annotations

import signal
import threading

from .errors import UserError

SIGNALS = tuple(s for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGUSR1", None),
                            getattr(signal, "SIGUSR2", None)) if s is not None)


class Interrupted(UserError):
    """The run stopped on a signal after saving a resumable checkpoint."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


# A stop asked for by this process itself rather than by a signal (the sweep it belongs to was interrupted, or
# the command that started it died): every GracefulStop, present and future, sees it.
_ASKED: list[str] = []


def ask_to_stop(reason: str) -> None:
    """Stop this process's training at the next step boundary, saved, as if signalled (thread-safe)."""
    if not _ASKED:
        _ASKED.append(reason)


class GracefulStop:
    """Context manager: ``stop.requested`` turns true when one of SIGNALS arrives (or ``ask_to_stop`` is called)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        if self.signum is None and _ASKED:
            self.signum = signal.SIGTERM
        return self.signum is not None

    def _handler(self, signum, frame) -> None:
        self.signum = signum

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def hand_on(self) -> bool:
        """Call the handler that was installed before ours, if it is Python code.

        Returns True when that handler returned (it wants the run to go on, as submitit's TERM
        bypass does); False when there was none, so the caller should stop.
        """
        if _ASKED:  # not a signal of the launcher's: nothing to hand on, the run stops
            return False
        signum, self.signum = self.signum, None
        previous = self._previous.get(signum)
        if callable(previous) and previous is not signal.default_int_handler:
            previous(signum, None)  # may requeue and exit (submitit) or raise
            return True
        self.signum = signum
        return False

    def name(self) -> str:
        if _ASKED:
            return _ASKED[0]
        return signal.Signals(self.signum).name if self.signum is not None else ""


def stop_here(stop: GracefulStop, message: str, log) -> None:
    """A signal arrived and the state is saved: say so, then hand the signal on to the handler installed before
    ours (submitit's requeue, which may exit; its TERM bypass, which returns: the run then goes on), or end the
    run with ``Interrupted``. The one way both training loops stop."""
    log.warning(message)
    if not stop.hand_on():
        raise Interrupted(stop.signum, message)
