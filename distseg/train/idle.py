"""A pause for Ray Data's streaming executor when it has nothing to wait on (training ingest).

Ray Data 2.60's streaming executor blocks in `ray.wait` on its running tasks, which returns at once
when one of them has finished. While a training run consumes slower than the reads and views are made,
finished tasks sit there with their outputs held back by backpressure, so every scheduling step returns
at once and the training dataset's SplitCoordinator loops without pausing for the whole run: measured
at 40-90 % of a core beside each 1-worker CPU training of `hiergroup_msrc` (py-spy: 84 % of its samples
in `StreamingExecutor.run`, 36 % in `ResourceManager.update_usages`, 4 % in `ray.wait`). On a 2-core
machine that is CPU taken from whatever runs beside the training (a second run, evaluation, tests, the
ingest's own tasks). `IdleBackoff` sleeps `IDLE_S` after a step
in which nothing moved (no input taken, task submitted, output made or handed on, no change in the
output queue); a step that moves anything runs the next one at once, so the cost is at most `IDLE_S`
of latency after the trainer takes a block, which the prefetched batches hide.

Measured on the 2-core CPU machine (`distseg pretrain --config hiergroup_msrc`, 1 worker): the
coordinator's CPU went from 40-90 % of a core to 12-14 % (`ps` over the first 10 minutes; docs/RESULTS.md,
"Training throughput"). A training alone on the machine had the other core to spin on: its own rate
was 5.1-5.5 images/s with the spin at the end of a run, 4.2-4.6 without it early in one, not an A/B."""

from __future__ import annotations

import time

from ray.data._internal.execution.execution_callback import ExecutionCallback

IDLE_S = 0.02


class IdleBackoff(ExecutionCallback):
    """Sleep `IDLE_S` after a scheduling step in which nothing moved (one instance per execution)."""

    def __init__(self) -> None:
        self._last: tuple | None = None

    def on_execution_step(self, executor) -> None:
        now = _progress(executor)
        if now is not None and now == self._last:
            time.sleep(IDLE_S)
        self._last = now


def _progress(executor) -> tuple | None:
    """What a scheduling step can change, per operator (what Ray's own NoProgressGuard compares, and the
    tasks submitted and outputs made); None where Ray's internals differ from 2.60's (nothing sleeps)."""
    try:
        return tuple(
            (
                op.metrics.num_inputs_received,
                op.metrics.num_tasks_submitted,
                op.metrics.num_task_outputs_generated,
                op.metrics.num_outputs_taken,
                state.total_enqueued_input_blocks(),
                state.total_enqueued_output_blocks(),
            )
            for op, state in executor._topology.items()
        )
    except (AttributeError, TypeError):
        return None


def quiet_when_idle(context) -> None:
    """Install IdleBackoff in a Ray DataContext (once); datasets created after it carry it to their
    executors, the SplitCoordinator of a training's `streaming_split` included."""
    if IdleBackoff not in context.custom_execution_callback_classes:
        context.custom_execution_callback_classes.append(IdleBackoff)
