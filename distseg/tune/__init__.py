"""Ray Tune sweeps over the methods' knobs (`distseg tune`): search-space files and the sweep driver."""

from distseg.tune.space import SearchSpace, SpaceError, load_space
from distseg.tune.sweep import SweepError, SweepResult, plan_concurrency, print_summary, sweep

__all__ = [
    "SearchSpace",
    "SpaceError",
    "SweepError",
    "SweepResult",
    "load_space",
    "plan_concurrency",
    "print_summary",
    "sweep",
]
