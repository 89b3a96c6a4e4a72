"""Search-space files (`tune_spaces/*.yaml`): dotted config keys mapped to search domains.

    description: what the sweep asks
    config: hiergroup              # the base config (CLI --config replaces it)
    overrides: [pretrain.steps=600, pretrain.probe_every=100]   # fixed for every trial
    metric: probe_score            # reported during training (see distseg.train.probe)
    mode: max
    num_samples: 8                 # samples of the random domains (a grid is repeated this often)
    scheduler: {name: asha, grace_period: 100, reduction_factor: 3}
    max_concurrent_trials: null    # null: as many as the cluster holds (distseg.tune.sweep.plan_concurrency)
    params:
      losses.hiergroup.sigma_p: {loguniform: [0.2, 3.0]}
      losses.hiergroup.cns: {grid: [0, 5, 20]}
      pretrain.lr: {choice: [0.001, 0.003]}

Domains: `loguniform: [lo, hi]`, `uniform: [lo, hi]`, `quniform: [lo, hi, q]`, `randint: [lo, hi]`
(hi excluded, as Ray Tune's), `choice: [v, ...]`, `grid: [v, ...]`. Every key and every value a domain
can produce at its ends is checked against the config schema before Ray starts (`SpaceError` names
the file and the key).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from distseg.core.section import Section

DOMAINS = ("loguniform", "uniform", "quniform", "randint", "choice", "grid")


class SpaceError(ValueError):
    """A search-space file that cannot be swept (unknown key, bad domain, bad metric)."""


class SchedulerSpec(Section):
    """`scheduler:` of a space file: ASHA early stopping on `metric`, counted in optimizer steps."""

    name: Literal["asha", "fifo"] = Field("asha", description="asha (early stopping) | fifo (all run to the end)")
    grace_period: int | None = Field(
        None, ge=1, description="steps a trial runs before it can be stopped (default: pretrain.probe_every)"
    )
    reduction_factor: float = Field(2.0, gt=1, description="ASHA keeps the top 1/reduction_factor at each rung")


class SearchSpace(Section):
    """A `tune_spaces/*.yaml` file (see the module docstring)."""

    description: str = Field("", description="what the sweep asks, for people")
    config: str = Field("hiergroup", description="the base config: a shipped name or a YAML path")
    overrides: list[str] = Field(default_factory=list, description="KEY=VALUE overrides applied to every trial")
    metric: str = Field("probe_score", description="the reported metric trials are compared on")
    mode: Literal["max", "min"] = Field("max", description="max | min")
    num_samples: int = Field(1, ge=1, description="samples of the random domains (a grid is repeated this often)")
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    max_concurrent_trials: int | None = Field(None, ge=1, description="null: as many as the cluster holds")
    params: dict[str, dict[str, list]] = Field(..., min_length=1, description="dotted config key -> {domain: args}")

    @field_validator("params")
    @classmethod
    def _domains(cls, params: dict[str, dict[str, list]]) -> dict[str, dict[str, list]]:
        for key, domain in params.items():
            domain_args(key, domain)
        return params


def domain_args(key: str, domain: dict[str, list]) -> tuple[str, list]:
    """(kind, args) of one domain, checked: one known kind, the right number and order of bounds."""
    if not isinstance(domain, dict) or len(domain) != 1:
        raise ValueError(f"params.{key}: a domain is one of {{{', '.join(DOMAINS)}: ...}}, got {domain!r}")
    ((kind, args),) = domain.items()
    if kind not in DOMAINS:
        raise ValueError(f"params.{key}: unknown domain {kind!r} (known: {', '.join(DOMAINS)})")
    if not isinstance(args, list) or not args:
        raise ValueError(f"params.{key}: {kind} takes a non-empty list, got {args!r}")
    if kind in ("loguniform", "uniform", "randint", "quniform"):
        n = 3 if kind == "quniform" else 2
        if len(args) != n or not all(isinstance(a, int | float) and not isinstance(a, bool) for a in args):
            raise ValueError(f"params.{key}: {kind} takes {n} numbers, got {args!r}")
        if not args[0] < args[1]:
            raise ValueError(f"params.{key}: {kind} needs lower < upper, got {args!r}")
        if kind == "loguniform" and args[0] <= 0:
            raise ValueError(f"params.{key}: loguniform needs a positive lower bound, got {args[0]!r}")
        if kind == "randint" and not all(isinstance(a, int) for a in args):
            raise ValueError(f"params.{key}: randint takes integers, got {args!r}")
    return kind, args


def end_values(domain: dict[str, list]) -> list[Any]:
    """The values at a domain's ends (what the schema check tries)."""
    kind, args = next(iter(domain.items()))
    if kind in ("choice", "grid"):
        return list(args)
    if kind == "randint":
        return [args[0], args[1] - 1]
    return [args[0], args[1]]


def to_tune(domain: dict[str, list]):
    """The Ray Tune search domain of one checked domain."""
    from ray import tune

    kind, args = next(iter(domain.items()))
    if kind == "grid":
        return tune.grid_search(list(args))
    if kind == "choice":
        return tune.choice(list(args))
    if kind == "quniform":
        return tune.quniform(*args)
    return getattr(tune, kind)(*args)


def load_space(path: str | Path) -> SearchSpace:
    """Read and check a space file: its own schema, then every key and end value against the config."""
    path = Path(path)
    if not path.is_file():
        shipped = Path(__file__).resolve().parents[2] / "tune_spaces" / f"{path.name}.yaml"
        if shipped.is_file() and path.suffix != ".yaml":
            path = shipped
        else:
            raise SpaceError(f"search space {path} does not exist (see tune_spaces/ for examples)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SpaceError(f"search space {path}: not valid YAML: {e}") from None
    try:
        space = SearchSpace.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"])
            msg = str(err["msg"]).removeprefix("Value error, ")
            problems.append(msg if msg.startswith("params.") else f"{key}: {msg}")
        raise SpaceError(f"search space {path}: " + "; ".join(problems)) from None
    return space


def check_against_config(space: SearchSpace, base: dict, source: str) -> None:
    """Every swept key exists in the config and each end value of its domain validates there."""
    from distseg.config import ConfigError, apply_overrides, build_config

    for key, domain in space.params.items():
        for value in end_values(domain):
            try:
                build_config(apply_overrides(base, [f"{key}={json.dumps(value)}"]), "<trial>")
            except ConfigError as e:
                raise SpaceError(f"search space {source}: params.{key} = {value!r}: {e}") from None
