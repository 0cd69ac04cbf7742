"""The interrupt rule: a Ctrl-C that lands in a finalizer is neither reported as a traceback nor lost.

Run in a fresh interpreter: pytest replaces sys.unraisablehook around every test, and the command line's is what
is checked."""
import subprocess
import sys

SCRIPT = """
import os, signal, sys, weakref
from lt_jax import progress
progress.catch_interrupts()
class Thing: pass
thing = Thing()
# where CI's SIGINT landed: a finalizer run by the garbage collector (jax's finalize_const)
weakref.finalize(thing, lambda: os.kill(os.getpid(), signal.SIGINT))
del thing
print("swallowed" if progress.interrupted() else "not seen", flush=True)
other = Thing()
weakref.finalize(other, lambda: 1 / 0)  # any other error in a finalizer is still reported
del other
try:
    progress.progress_bar(3, "work", "item").update()
except KeyboardInterrupt:
    sys.exit(130)
"""


def test_an_interrupt_inside_a_finalizer_is_silent_and_raised_again():
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert run.returncode == 130 and run.stdout == "swallowed\n", (run.returncode, run.stdout, run.stderr)
    assert "KeyboardInterrupt" not in run.stderr, run.stderr
    assert "ZeroDivisionError" in run.stderr, run.stderr
