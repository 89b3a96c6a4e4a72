"""IdleBackoff (distseg/train/idle.py): Ray Data's streaming executor pauses while its consumer holds it
back, rather than looping without a pause (what a training's SplitCoordinator did for a whole run)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from distseg.train.idle import IDLE_S, IdleBackoff, _progress, quiet_when_idle


class Counting(IdleBackoff):
    """IdleBackoff that appends each scheduling step (monotonic time, progress) to `log`."""

    log = ""

    def on_execution_step(self, executor) -> None:
        with open(self.log, "a") as f:
            f.write(f"{time.monotonic()}\t{_progress(executor)!r}\n")
        super().on_execution_step(executor)


def test_the_training_split_pauses_while_the_trainer_holds_it_back(tmp_path):
    """As in training: a streaming_split whose SplitCoordinator runs the executor in its own process, and
    a consumer that stops taking batches for two seconds."""
    import ray
    import ray.data
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the coordinator gets Counting by value
    Counting.log = str(tmp_path / "steps.tsv")
    ray.init(num_cpus=2, object_store_memory=100 * 1024**2, include_dashboard=False, logging_level="ERROR")
    context = ray.data.DataContext.get_current()
    saved = list(context.custom_execution_callback_classes)
    try:
        quiet_when_idle(context)
        quiet_when_idle(context)
        assert context.custom_execution_callback_classes.count(IdleBackoff) == 1  # installed once
        context.custom_execution_callback_classes[:] = [*saved, Counting]
        # 160 MB of rows (40 blocks) through a 100 MB object store: the reads outrun the consumer, then wait
        ds = ray.data.range(160, override_num_blocks=40).map_batches(
            lambda b: {"id": b["id"], "payload": np.ones((len(b["id"]), 1024**2), np.uint8)}, batch_size=4
        )
        (split,) = ds.streaming_split(1, equal=True)
        ids, pause = [], (0.0, 0.0)
        for i, batch in enumerate(split.iter_batches(batch_size=4, prefetch_batches=1)):
            ids.extend(batch["id"].tolist())
            if i == 0:  # hold the executor back until nothing moves any more, then two seconds more
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and not _settled(Counting.log):
                    time.sleep(0.2)
                start = time.monotonic()
                time.sleep(2.0)
                pause = (start, time.monotonic())
    finally:
        context.custom_execution_callback_classes[:] = saved
        ray.shutdown()
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])

    assert sorted(ids) == list(range(160))  # every row, once
    steps = _steps(Counting.log)
    assert steps and all(p != "None" for _, p in steps)  # Ray's internals are still those _progress reads
    during = [p for t, p in steps if pause[0] < t < pause[1]]
    still = sum(a == b for a, b in zip(during, during[1:]))
    assert still >= 3, f"{len(during)} steps while the consumer paused, {still} without a change"
    # each step without a change sleeps IDLE_S, so at most one of them per IDLE_S (without the backoff the
    # coordinator ran about 250 steps a second here, nearly all without a change). Steps that moved something
    # run at once and are not bounded: on a loaded machine (CI) the reads may still be finishing in the pause.
    assert still <= (pause[1] - pause[0]) / IDLE_S + 2, f"{still} steps without a change in {pause[1] - pause[0]:.2f} s"


def _steps(log: str) -> list[tuple[float, str]]:
    if not Path(log).is_file():
        return []
    rows = [line.rstrip("\n").split("\t") for line in Path(log).read_text().splitlines()]
    return [(float(t), p) for t, p in rows if p]


def _settled(log: str, quiet_s: float = 0.5) -> bool:
    """Whether the executor's progress has not changed for `quiet_s` (and at least three steps)."""
    steps = _steps(log)
    if len(steps) < 3 or steps[-1][1] != steps[-2][1] or steps[-2][1] != steps[-3][1]:
        return False
    last = steps[-1][1]
    changed = max((t for t, p in steps if p != last), default=steps[0][0])
    return steps[-1][0] - changed >= quiet_s
