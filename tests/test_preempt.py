"""preempt.py: a signal only raises a flag; the loop saves, then hands the signal on or stops."""

from __future__ import annotations

import logging
import os
import signal

import pytest

from rethink_tl.preempt import GracefulStop, Interrupted, stop_here

log = logging.getLogger("test")


def test_a_signal_sets_the_flag_and_the_previous_handler_comes_back():
    before = signal.getsignal(signal.SIGUSR1)
    with GracefulStop() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested and stop.name() == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before


def test_without_an_earlier_handler_the_run_ends_interrupted():
    signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGUSR2)
        with pytest.raises(Interrupted) as err:
            stop_here(stop, "stopped by SIGUSR2; saved", log)
    assert err.value.signum == signal.SIGUSR2 and str(err.value) == "stopped by SIGUSR2; saved"


def test_an_earlier_python_handler_runs_and_the_run_goes_on():
    seen = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: seen.append(signum))
    try:
        with GracefulStop() as stop:
            os.kill(os.getpid(), signal.SIGUSR2)
            stop_here(stop, "saved, handing on", log)  # returns: the earlier handler (submitit's bypass) wants more
            assert seen == [signal.SIGUSR2] and not stop.requested
    finally:
        signal.signal(signal.SIGUSR2, previous)
