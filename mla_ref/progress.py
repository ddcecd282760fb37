"""A progress line on stderr for long runs of the command line: cases done / total, the current case, elapsed time.

Plumbing, not math: the steps never see it. It draws only on a terminal, only when not
asked to be quiet, and only once a run has lasted ``delay`` seconds, so short runs, pipes
and logs stay clean. It redraws once a second from a daemon thread, so a case that takes a
minute still shows the clock moving.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

DELAY_SECONDS = 2.0


class Progress:
    """``progress(done, total, case_id)`` before each case; ``close()`` clears the line. Use as a context manager."""

    def __init__(self, stream: TextIO | None = None, *, quiet: bool = False, delay: float = DELAY_SECONDS,
                 interval: float = 1.0) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = not quiet and bool(getattr(self.stream, "isatty", lambda: False)())
        self.delay = delay
        self.interval = interval
        self.started = time.monotonic()
        self.state: tuple[int, int, str] | None = None
        self.width = 0
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None

    def __call__(self, done: int, total: int, case_id: str) -> None:
        if not self.enabled:
            return
        with self.lock:
            self.state = (done, total, case_id)
        if self.thread is None:
            self.thread = threading.Thread(target=self._redraw_until_closed, name="mla-ref-progress", daemon=True)
            self.thread.start()
        self._draw()

    def line(self) -> str:
        """``[done/total] case_id  elapsed s``, the text drawn."""
        if self.state is None:
            return ""
        done, total, case_id = self.state
        return f"[{done}/{total}] {case_id}  {time.monotonic() - self.started:.0f} s"

    def _draw(self) -> None:
        with self.lock:
            if self.stopped.is_set() or time.monotonic() - self.started < self.delay:
                return
            text = self.line()
            self.stream.write("\r" + text.ljust(self.width))
            self.stream.flush()
            self.width = len(text)

    def _redraw_until_closed(self) -> None:
        while not self.stopped.wait(self.interval):
            self._draw()

    def close(self) -> None:
        """Stop redrawing and erase the line (the next output starts on a clean line)."""
        with self.lock:
            self.stopped.set()
            if self.width:
                self.stream.write("\r" + " " * self.width + "\r")
                self.stream.flush()
                self.width = 0
        if self.thread is not None:
            self.thread.join()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
