"""SIGTERM and SIGINT during a run: the first finishes the step, saves and stops; a second
stops at once (the last checkpoint stands)."""

from __future__ import annotations

import logging
import signal

log = logging.getLogger("meml")


class StopRequested(RuntimeError):
    """SIGTERM/SIGINT arrived; a checkpoint was saved at the end of the step."""

    def __init__(self, stage: str, step: int):
        super().__init__(f"stopped on request after {stage} step {step}")
        self.stage, self.step = stage, step


class Interrupted(KeyboardInterrupt):
    """A second SIGTERM/SIGINT: stop at once, without saving (the last checkpoint stands)."""

    def __init__(self, signum: int):
        super().__init__(f"stopped at once by a second signal {signal.Signals(signum).name}")
        self.signum = signum


class StopSignals:
    """Handlers for SIGTERM and SIGINT during a run.

    The first signal sets s.stop_requested: the step finishes, a checkpoint is saved and the
    run stops. A second one raises `Interrupted` at once (nothing more is saved; a
    checkpoint being written is abandoned and its temporary directory removed).
    `restore` puts back the handlers that were there before.
    """

    def __init__(self, s):
        self.s, self.signum, self._previous = s, 0, {}  # s: the Session, whose stop_requested is set

    def __call__(self, signum, _frame) -> None:
        if self.s.stop_requested:
            raise Interrupted(signum)
        self.signum = signum
        self.s.stop_requested = True
        log.warning(
            "received %s: finishing this step, saving a checkpoint, then exiting (send it again to stop at once)",
            signal.Signals(signum).name,
        )

    def install(self) -> StopSignals:
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self)
        except ValueError:  # not the main thread: signals stay with whoever owns them
            pass
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def install_signal_handlers(s) -> StopSignals:
    return StopSignals(s).install()
