"""The SIGTERM handler itself, in a fresh interpreter (its state is process-wide): the first-things callback runs
inside the handler, the interruption is StopRequested, later checks see it, a second SIGTERM is the default."""

import subprocess
import sys

SCRIPT = r"""
import os, signal
from distill.core import graceful_stop as g
marks = []
assert g.install_sigterm_handler()
assert not g.sigterm_received()
g.raise_if_stopping()  # nothing yet
try:
    with g.first_on_sigterm(lambda: marks.append("first")):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10**7):
            pass
    print("not interrupted")
except g.StopRequested as exc:
    print("stop:", exc, marks, g.sigterm_received())
try:
    g.raise_if_stopping()
except g.StopRequested:
    print("still stopping")
print("default again:", signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)
"""


def test_sigterm_becomes_stop_requested_after_the_first_things():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "stop: stopped by SIGTERM ['first'] True", lines
    assert lines[1] == "still stopping" and lines[2] == "default again: True", lines


DEFERRED = r"""
import os, signal
from distill.core import graceful_stop as g
g.install_sigterm_handler()
done = []
try:
    with g.sigterm_deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10**6):
            pass
        done.append("bookkeeping finished")
except g.StopRequested:
    print("raised after:", done)
"""


def test_a_sigterm_inside_a_deferred_block_is_raised_when_it_ends():
    out = subprocess.run([sys.executable, "-c", DEFERRED], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "raised after: ['bookkeeping finished']"
