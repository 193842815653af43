"""Search spaces by method: each module holds SPACE (Optuna distributions) and PAPER_POINT, the
paper's CIFAR-10 point. Where a paper's values differ on another data set, the module also holds
DATASET_POINT (data set -> the values that differ) and, where its CIFAR range would not hold them,
DATASET_SPACE (data set -> the ranges that replace CIFAR's)."""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from optuna.distributions import (BaseDistribution, CategoricalDistribution, FloatDistribution,
                                  IntDistribution)


@dataclass(frozen=True)
class Space:
    distributions: dict[str, BaseDistribution]
    paper_point: dict[str, object]


def get(method: str, dataset: str = "cifar10") -> Space:
    """Returns the method's search space on `dataset`: SPACE and PAPER_POINT with that data set's
    DATASET_SPACE ranges and DATASET_POINT values; ValueError if the method has no space, or if a
    paper point lies outside its range (a module that contradicts itself)."""
    try:
        module = importlib.import_module(f"spaces.{method}")
    except ModuleNotFoundError:
        raise ValueError(f"no search space for method {method!r}") from None
    distributions = {**module.SPACE, **getattr(module, "DATASET_SPACE", {}).get(dataset, {})}
    point = {**module.PAPER_POINT, **getattr(module, "DATASET_POINT", {}).get(dataset, {})}
    for name, value in point.items():
        if not _contains(distributions[name], value):
            raise ValueError(f"spaces.{method} on {dataset}: paper point {name}={value!r} lies outside "
                             f"its searched {describe(distributions[name])}")
    return Space(distributions, point)


def describe(dist: BaseDistribution) -> str:
    """Returns a short human form of a distribution: 'log-uniform [0.1, 100]', 'one of [3]'."""
    if isinstance(dist, CategoricalDistribution):
        return f"one of {list(dist.choices)}"
    kind = "log-uniform" if dist.log else ("integer" if isinstance(dist, IntDistribution) else "uniform")
    return f"{kind} [{dist.low:g}, {dist.high:g}]"


def _contains(dist: BaseDistribution, value) -> bool:
    if isinstance(dist, CategoricalDistribution):
        return value in dist.choices
    return isinstance(value, (int, float)) and dist.low <= value <= dist.high


def override(space: Space, name: str, text: str) -> Space:
    """Returns `space` with one parameter narrowed: 'LOW:HIGH' (a sub-range), 'A,B' (a subset of
    choices) or 'VALUE' (fixed). ValueError, one line, if it leaves the paper's range."""
    if name not in space.distributions:
        raise ValueError(f"--space {name}: not a searched parameter; expected one of "
                         f"{', '.join(space.distributions)}")
    dist = space.distributions[name]
    if isinstance(dist, CategoricalDistribution):
        cast = type(dist.choices[0])
        values = [cast(v) for v in text.split(",")]
        bad = [v for v in values if not _contains(dist, v)]
        if bad:
            raise ValueError(f"--space {name}={text}: {bad} not in the allowed {describe(dist)}")
        new = CategoricalDistribution(values)
    else:
        low_text, sep, high_text = text.partition(":")
        try:
            low = float(low_text)
            high = float(high_text) if sep else low
        except ValueError:
            raise ValueError(f"--space {name}={text}: expected LOW:HIGH or a number") from None
        if isinstance(dist, IntDistribution):
            low, high = int(low), int(high)
        if low > high or not (_contains(dist, low) and _contains(dist, high)):
            raise ValueError(f"--space {name}={text}: out of range; allowed {describe(dist)}")
        new = (CategoricalDistribution([low]) if low == high else
               type(dist)(low, high, log=dist.log))
    distributions = {**space.distributions, name: new}
    point = dict(space.paper_point)
    if not _contains(new, point.get(name)):
        point[name] = new.choices[0] if isinstance(new, CategoricalDistribution) else (
            (new.low * new.high) ** 0.5 if new.log else (new.low + new.high) / 2)
    return Space(distributions, point)


def moved(space: Space, values: dict[str, object]) -> Space:
    """Returns `space` with its paper point at `values` for the searched parameters they name: a
    data set's own default (CALA's K on CIFAR-100) or a large-set recipe's value (its learning
    rate). A log-uniform range moves with its point, keeping its ratios to it (the CIFAR lr range
    0.02-0.2 around 0.1 becomes 0.005-0.05 around a recipe's 0.025); any other range must already
    hold the new point (ValueError, one line, if not)."""
    distributions, point = dict(space.distributions), dict(space.paper_point)
    for name, value in values.items():
        dist = distributions.get(name)
        if dist is None or point.get(name) == value:
            continue
        if isinstance(dist, FloatDistribution) and dist.log and isinstance(value, (int, float)) and value > 0:
            ratio = value / point[name]
            distributions[name] = FloatDistribution(dist.low * ratio, dist.high * ratio, log=True)
        elif not _contains(dist, value):
            raise ValueError(f"{name}={value!r} lies outside the searched {describe(dist)}")
        point[name] = value
    return Space(distributions, point)


__all__ = ["Space", "get", "describe", "override", "moved", "FloatDistribution"]
