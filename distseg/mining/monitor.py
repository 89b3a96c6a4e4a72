"""The crash monitor: per-image attempts across worker restarts, worker statistics, crash messages."""

from __future__ import annotations

import time


class MineMonitor:
    """One per mine() run, 0 CPUs: the workers report each image's start and end to it.

    An image that began and never ended was running when its worker process died: `begin` returns
    how many times that already happened, so the worker can give up on an image that keeps crashing
    it. It also counts finished images (for the progress line; an image redone after a crash counts
    again) and keeps the latest statistics of every worker process.
    """

    def __init__(self, total: int):
        self.total = total
        self.attempts: dict[str, int] = {}  # image_id -> attempts begun and not (yet) finished
        self.owner: dict[str, str] = {}  # image_id -> uri, while in flight
        self.finished = self.errors = self.crashed = 0
        self.first_begin: float | None = None
        self.last_end: float | None = None
        self.workers: dict[str, dict] = {}

    def begin(self, image_id: str, uri: str) -> int:
        crashes = self.attempts.get(image_id, 0)
        self.attempts[image_id] = crashes + 1
        self.owner[image_id] = uri
        if self.first_begin is None:
            self.first_begin = time.time()
        return crashes

    def end(self, image_ids: list[str], errors: int, crashed: int, stats: dict) -> None:
        for image_id in image_ids:
            self.attempts.pop(image_id, None)
            self.owner.pop(image_id, None)
        self.finished += len(image_ids)
        self.errors += errors
        self.crashed += crashed
        self.last_end = time.time()
        self.workers[stats["worker"]] = stats

    def progress(self) -> dict:
        return {
            "total": self.total,
            "finished": self.finished,
            "errors": self.errors,
            "crashed": self.crashed,
            "first_begin": self.first_begin,
            "last_end": self.last_end,
        }

    def report(self) -> dict:
        in_flight = {i: (self.owner[i], n) for i, n in self.attempts.items() if i in self.owner}
        return {**self.progress(), "workers": list(self.workers.values()), "in_flight": in_flight}


def is_actor_death(error: BaseException) -> bool:
    """Whether a worker actor's death (RayActorError) is in the chain of causes of `error`."""
    from ray.exceptions import RayActorError

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, RayActorError):
            return True
        error = error.__cause__ or error.__context__
    return False


def crash_message(monitor, max_restarts: int, output_uri: str) -> str:
    """The MiningError message when the workers' restarts ran out: the images in flight (from the
    MineMonitor actor handle `monitor`), most attempts first, and how to resume."""
    import ray

    try:
        in_flight = ray.get(monitor.report.remote(), timeout=30)["in_flight"]
    except Exception:
        in_flight = {}
    # most attempts first: an image tried more than once is the likely culprit
    ranked = sorted(in_flight.values(), key=lambda item: (-item[1], item[0]))
    names = [f"{uri} ({attempts} attempts)" if attempts > 1 else uri for uri, attempts in ranked]
    named = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
    return (
        f"a mining worker process died more than its {max_restarts} restarts allow "
        f"(crashes in native code such as OpenCV or higra, or out of memory); "
        f"images in flight when the workers died: {named or 'unknown'}. "
        f"The shards written so far are kept in {output_uri}: rerun the same command to resume."
    )
