"""What the command-line tools print around their work (imports no TensorFlow itself).

- :func:`import_tensorflow`: TensorFlow imported with its start-up log lines hidden
  (``oneDNN custom operations are on``, ``Could not find cuda drivers``, ``failed call to
  cuInit``, ...) unless ``--verbose``. Some of them are written by the C++ runtime before
  its logging is configured, so ``TF_CPP_MIN_LOG_LEVEL`` alone does not silence them: the
  process's standard error is pointed at ``/dev/null`` while TensorFlow loads and starts
  its CPU device, then restored.
- :class:`Progress`: a bar redrawn in place on a terminal, one plain line per step when
  the output is a file or a pipe (no carriage returns or colour codes in logs).
"""

from __future__ import annotations

import os
import sys
import time


_STARTED = False


def import_tensorflow(verbose: bool = False):
    """The ``tensorflow`` module, imported (and its CPU device started) quietly unless
    ``verbose``. Later TensorFlow messages of level ERROR and below stay hidden too."""
    global _STARTED
    if verbose:
        import tensorflow as tf
        return tf
    if _STARTED:
        return sys.modules["tensorflow"]
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        import tensorflow as tf
        tf.config.list_logical_devices("CPU")
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)
    tf.get_logger().setLevel("ERROR")
    _STARTED = True
    return tf


def is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class Progress:
    """Progress over ``total`` steps: ``step(text)`` after each one.

    On a terminal: one line redrawn in place (``[#####-----] 3/10 pairs  text``). Else:
    ``[3/10] text (1.2 s)``, one line per step, nothing else.
    """

    WIDTH = 30

    def __init__(self, total: int, unit: str = "items", stream=None):
        self.total, self.unit = int(total), unit
        self.stream = stream if stream is not None else sys.stdout
        self.done = 0
        self.terminal = is_terminal(self.stream)
        self.last = time.perf_counter()

    def step(self, text: str = "") -> None:
        self.done += 1
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        if self.terminal:
            filled = self.WIDTH * self.done // max(self.total, 1)
            bar = "#" * filled + "-" * (self.WIDTH - filled)
            end = "\n" if self.done >= self.total else ""
            self.stream.write(f"\r[{bar}] {self.done}/{self.total} {self.unit}  "
                              f"{text[:40]:<40}{end}")
        else:
            self.stream.write(f"[{self.done}/{self.total}] {text} ({seconds:.1f} s)\n")
        self.stream.flush()
