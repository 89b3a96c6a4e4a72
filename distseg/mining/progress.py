"""The progress line of a mining run: images done, images/s, errors, ETA."""

from __future__ import annotations

import sys
import threading
import time

PROGRESS_LOG_SECONDS = 10.0  # interval of the images/s progress line


class ProgressLine:
    """While mining, a line on stderr every `interval` seconds and one at the end: images done, images/s,
    errors, ETA.

    Ray Data's progress shows no rate in its non-terminal log (ray job logs, CI, a pipe), and on a
    terminal its operator bar's long description pushes the rows/s past the line's end, so this line
    is printed in both cases (Ray's driver print keeps its bars intact). Rates count from the first
    image started, so Ray and actor start-up do not dilute them."""

    def __init__(self, monitor, interval: float = PROGRESS_LOG_SECONDS):
        self.monitor = monitor
        self.interval = interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="distseg-mine-progress", daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=5)
        self._print(timeout=5)  # the last count, also for a run shorter than one interval

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            self._print(timeout=self.interval)

    def _print(self, timeout: float) -> None:
        import ray

        try:
            p = ray.get(self.monitor.progress.remote(), timeout=timeout)
        except Exception:  # a slow, restarting or failed cluster: skip this line
            return
        print(format_progress(p, time.time()), file=sys.stderr, flush=True)


def format_progress(p: dict, now: float) -> str:
    done, total = p["finished"], p["total"]
    line = f"mine: {done}/{total} images"
    if p["first_begin"] is not None and done:
        elapsed = max(1e-9, (p["last_end"] or now) - p["first_begin"])
        rate = done / elapsed
        eta = (total - done) / rate if rate > 0 else float("inf")
        line += f", {rate:.2f} images/s, ETA {eta:.0f} s"
    line += f", {p['errors']} errors"
    return line + (f" ({p['crashed']} worker crashes)" if p["crashed"] else "")
