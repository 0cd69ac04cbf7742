"""Progress bars on stderr, and the interrupt rule of every long command (it imports only tqdm).

Ctrl-C (SIGINT) raises KeyboardInterrupt at once, as Python's default handler does, and also sets a flag that
every progress bar checks when it advances: an interrupt that lands where an exception is swallowed (a callback
run by the garbage collector, say) is raised again at the next work item instead of being lost, and Python's
"Exception ignored in ..." report of the swallowed one is silenced. The command line ends the run with one line
saying how far it got (`where`) and exit status 130.
"""
from __future__ import annotations

import signal
import sys

from tqdm import tqdm

_state = {"interrupted": False, "where": None}


class _Bar(tqdm):
    def update(self, n=1):
        check_interrupt()
        if self.disable:  # a disabled tqdm keeps no count
            return None
        out = super().update(n)
        _state["where"] = (self.desc, self.n, self.total, self.unit)
        return out

    def wrap(self, items):
        """Yields each item, advancing the bar after each; closes it at the end."""
        with self:
            for item in items:
                yield item
                self.update()


def progress_bar(total: int, desc: str, unit: str, disable: bool = False, initial: int = 0, leave: bool = False):
    """A tqdm bar on stderr that records how far it got (`where`) and raises a pending interrupt."""
    _state["where"] = (desc, initial, total, unit)
    return _Bar(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, disable=disable, leave=leave)


def _on_sigint(signum, frame):
    _state["interrupted"] = True
    raise KeyboardInterrupt


def _quiet_swallowed_interrupt(unraisable):
    # A KeyboardInterrupt raised inside a finalizer cannot propagate; check_interrupt raises it again later.
    if isinstance(unraisable.exc_value, KeyboardInterrupt) and _state["interrupted"]:
        return
    sys.__unraisablehook__(unraisable)


def catch_interrupts():
    """Install the handler (main thread only: the command line's entry point); `release_interrupts` undoes it."""
    _state.update(interrupted=False, where=None, previous_hook=sys.unraisablehook)
    signal.signal(signal.SIGINT, _on_sigint)
    sys.unraisablehook = _quiet_swallowed_interrupt


def release_interrupts():
    """Python's own Ctrl-C handler and the unraisable hook found before `catch_interrupts`."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.unraisablehook = _state.pop("previous_hook", sys.unraisablehook)


def check_interrupt():
    """Raise KeyboardInterrupt if Ctrl-C came and was swallowed since."""
    if _state["interrupted"]:
        raise KeyboardInterrupt


def interrupted() -> bool:
    return _state["interrupted"]


def where() -> str:
    """'after N of M UNITs (DESC)' of the bar advanced last, or '' if none ran."""
    if _state["where"] is None:
        return ""
    desc, n, total, unit = _state["where"]
    return f" after {n} of {total} {unit}{'s' if total != 1 else ''} ({desc})"
