"""rethink-tl: does ImageNet transfer learning help on your medical images?"""

import os as _os
import signal as _signal

__version__ = "0.1.0"


def _deaf_to_ctrl_c_in_a_sweep_worker() -> None:
    """In a worker process of a local parallel sweep (joblib's, submitit's on this machine), block SIGINT.

    The terminal sends Ctrl-C to the whole foreground process group. A worker that is importing, unpickling its
    job or waiting between two jobs would die of it, and the launcher would then kill the other workers mid-step.
    The command that started the sweep hears Ctrl-C instead and tells every worker through the sweep's
    INTERRUPTED mark, which a running job watches (sweeps.watch_parent): it saves and stops at its next step.
    This runs when the worker first imports rtl, before torch starts any thread, so all of them inherit it."""
    parent = _os.environ.get("RTL_SWEEP_PARENT")
    if parent and str(_os.getppid()) == parent and hasattr(_signal, "pthread_sigmask"):
        _signal.pthread_sigmask(_signal.SIG_BLOCK, {_signal.SIGINT})


_deaf_to_ctrl_c_in_a_sweep_worker()
