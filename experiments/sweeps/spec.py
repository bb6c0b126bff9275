"""A sweep's spec file: which experiment, the overrides every trial shares, a grid of values and
random draws; expanded into trials, each a list of Sacred ``with`` items.

::

    experiment: pipeline            # write | read | eval | pipeline | control (default pipeline)
    with: [smoke, model.llm=tiny]   # named configs and key=value overrides of every trial
    grid:                           # every combination of these values
      selector.name: [dot, cosine]
      read.top_k: [1, 3]
    random:                         # per grid point, `samples` draws of these (seeded)
      samples: 2
      seed: 0
      params:
        read.lr_z: {loguniform: [1.0e-5, 1.0e-3]}
        read.retrieval_weight: {uniform: [0.1, 1.0]}
        model.num_memory_tokens: {randint: [1, 4]}     # both ends included
        write.lr_projection: {choice: [0.01, 0.03]}
    metric: F1                      # what `pqa runs compare --sweep` ranks and plots by

Trials are the grid's product (in the order the keys are written, the last varying fastest), each
repeated ``samples`` times with fresh draws, as Ray Tune's ``grid_search`` with ``num_samples``.
A value is passed to Sacred as a Python literal, so strings, numbers, booleans and lists keep their type.
"""
from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

from pqa_core.config import EXPERIMENT_PHASES
from pqa_core.errors import UsageError

EXPERIMENTS = tuple(EXPERIMENT_PHASES)
TOP_KEYS = ("experiment", "with", "grid", "random", "metric")
DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")


@dataclass
class Trial:
    index: int
    params: Dict[str, Any]  # the swept keys and this trial's values
    items: List[str]  # Sacred ``with`` items: the shared ones, then the swept key=value

    def describe(self) -> str:
        return " ".join(f"{k}={v!r}" for k, v in self.params.items()) or "(no swept keys)"


@dataclass
class SweepSpec:
    experiment: str = "pipeline"
    shared: List[str] = field(default_factory=list)
    grid: Dict[str, List[Any]] = field(default_factory=dict)
    samples: int = 1
    seed: int = 0
    distributions: Dict[str, Dict[str, List[Any]]] = field(default_factory=dict)
    metric: str = ""
    source: str = "<spec>"

    @property
    def swept_keys(self) -> List[str]:
        return list(self.grid) + [k for k in self.distributions if k not in self.grid]

    def trials(self) -> List[Trial]:
        rng = random.Random(self.seed)
        points = list(itertools.product(*self.grid.values())) if self.grid else [()]
        trials = []
        for point in points:
            for _ in range(self.samples):
                params = dict(zip(self.grid, point))
                params.update({key: _draw(rng, dist) for key, dist in self.distributions.items()})
                items = self.shared + [f"{key}={value!r}" for key, value in params.items()]
                trials.append(Trial(len(trials), params, items))
        return trials

    def to_dict(self) -> Dict[str, Any]:
        return {"experiment": self.experiment, "with": self.shared, "grid": self.grid,
                "random": {"samples": self.samples, "seed": self.seed, "params": self.distributions},
                "metric": self.metric, "source": self.source}


def _draw(rng: random.Random, dist: Dict[str, List[Any]]):
    (kind, args), = dist.items()
    if kind == "choice":
        return rng.choice(args)
    if kind == "uniform":
        return rng.uniform(*args)
    if kind == "loguniform":
        return math.exp(rng.uniform(math.log(args[0]), math.log(args[1])))
    return rng.randint(*args)  # randint: both ends included


def load_spec(path) -> SweepSpec:
    """Read and check a spec file; a problem is one UsageError naming the file and the key (or line)."""
    import yaml

    path = Path(path)
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{where}: cannot read the sweep spec ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UsageError(f"{where}{line}: not valid YAML ({problem})") from None
    return parse_spec(data, where)


def parse_spec(data: Any, where: str = "<spec>") -> SweepSpec:
    if not isinstance(data, dict):
        raise UsageError(f"{where}: a sweep spec is a mapping with keys {', '.join(TOP_KEYS)}")
    for key in data:
        if key not in TOP_KEYS:
            raise UsageError(f"{where}: unknown key {key!r}; known: {', '.join(TOP_KEYS)}")
    spec = SweepSpec(source=where)
    spec.experiment = data.get("experiment", "pipeline")
    if spec.experiment not in EXPERIMENTS:
        raise UsageError(f"{where}: experiment: {spec.experiment!r} is not one of {', '.join(EXPERIMENTS)}")
    shared = data.get("with") or []
    if isinstance(shared, str):
        shared = shared.split()
    if not isinstance(shared, list) or not all(isinstance(item, str) for item in shared):
        raise UsageError(f"{where}: with: expected a list of named configs and key=value items")
    spec.shared = list(shared)
    grid = data.get("grid") or {}
    if not isinstance(grid, dict):
        raise UsageError(f"{where}: grid: expected a mapping of config keys to lists of values")
    for key, values in grid.items():
        _check_key(where, "grid", key)
        if not isinstance(values, list) or not values:
            raise UsageError(f"{where}: grid.{key}: expected a non-empty list of values, got {values!r}")
    spec.grid = {str(k): list(v) for k, v in grid.items()}
    rand = data.get("random") or {}
    if not isinstance(rand, dict):
        raise UsageError(f"{where}: random: expected a mapping with samples, seed, params")
    for key in rand:
        if key not in ("samples", "seed", "params"):
            raise UsageError(f"{where}: random.{key}: unknown key; known: samples, seed, params")
    spec.samples = rand.get("samples", 1)
    spec.seed = rand.get("seed", 0)
    for key in ("samples", "seed"):
        value = getattr(spec, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < (1 if key == "samples" else 0):
            raise UsageError(f"{where}: random.{key}: expected an integer >= {1 if key == 'samples' else 0}, "
                             f"got {value!r}")
    params = rand.get("params") or {}
    if not isinstance(params, dict):
        raise UsageError(f"{where}: random.params: expected a mapping of config keys to distributions")
    for key, dist in params.items():
        _check_key(where, "random.params", key)
        if key in spec.grid:
            raise UsageError(f"{where}: random.params.{key}: already swept by the grid")
        spec.distributions[str(key)] = _check_distribution(where, key, dist)
    metric = data.get("metric", "")
    if not isinstance(metric, str):
        raise UsageError(f"{where}: metric: expected a metric name such as F1, got {metric!r}")
    spec.metric = metric
    return spec


def _check_key(where: str, section: str, key) -> None:
    if not isinstance(key, str) or not key or "=" in key or " " in key:
        raise UsageError(f"{where}: {section}: {key!r} is not a config key (dotted, such as read.top_k)")


def _check_distribution(where: str, key: str, dist) -> Dict[str, List[Any]]:
    name = f"{where}: random.params.{key}"
    if not isinstance(dist, dict) or len(dist) != 1:
        raise UsageError(f"{name}: expected one of {{{', '.join(f'{d}: [...]' for d in DISTRIBUTIONS)}}}")
    (kind, args), = dist.items()
    if kind not in DISTRIBUTIONS:
        raise UsageError(f"{name}: unknown distribution {kind!r}; known: {', '.join(DISTRIBUTIONS)}")
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise UsageError(f"{name}: choice: expected a non-empty list of values")
        return {kind: list(args)}
    numeric = all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args) \
        if isinstance(args, list) else False
    if not numeric or len(args) != 2 or not args[0] < args[1]:
        raise UsageError(f"{name}: {kind}: expected [low, high] numbers with low < high, got {args!r}")
    if kind == "loguniform" and args[0] <= 0:
        raise UsageError(f"{name}: loguniform: expected low > 0, got {args[0]!r}")
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise UsageError(f"{name}: randint: expected integer bounds, got {args!r}")
    return {kind: list(args)}
