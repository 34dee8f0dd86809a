"""Attribution methods, one file each, behind one interface (`methods.base.Method`).

Sign convention for every method: a score > 0 means the training sample is a proponent of the
query (removing it is predicted to increase the query's loss or measurement). Add a method: one
file defining `METHOD`, plus one line in `_BUILT_IN` below.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from diffattr.artifacts.scores import Scores
from diffattr.methods import (
    calibrated,
    dtrak,
    ekfac,
    grad_cosine,
    grad_dot,
    kfac,
    pixel_cosine,
    random_baseline,
    retrac,
    tracin,
    trak,
)
from diffattr.methods.base import Method, MethodInputs

_BUILT_IN = (
    tracin.METHOD,
    retrac.METHOD,
    calibrated.METHOD,
    grad_cosine.METHOD,
    grad_dot.METHOD,
    trak.METHOD,
    dtrak.METHOD,
    kfac.METHOD,
    ekfac.METHOD,
    random_baseline.METHOD,
    pixel_cosine.METHOD,
)

REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Make a method available by name (to params, stages and notebooks)."""
    if method.name in REGISTRY and REGISTRY[method.name] is not method:
        raise ValueError(f"a method named {method.name!r} is already registered")
    REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    REGISTRY.pop(name, None)


@dataclass(frozen=True)
class MethodSpec:
    """One entry of `attribution.methods`: a name for its scores, the method and its args."""

    name: str
    method: Method
    args: Any

    def __call__(self, inputs: MethodInputs) -> Scores:
        return self.method(inputs, self.args)


def resolve_specs(entries: list) -> list[MethodSpec]:
    """`attribution.methods` entries → specs. An entry is a registered name ("retrac") or a
    mapping {name: label for its scores, method: registered name, args: {...}} for a variant,
    e.g. {name: retrac_grid, method: retrac, args: {train_side: grid, checkpoints: last}}."""
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"attribution.methods must be a non-empty list, got {entries!r}")
    specs = []
    for entry in entries:
        if isinstance(entry, str):
            method = get(entry)
            specs.append(MethodSpec(entry, method, method.make_args()))
            continue
        if not isinstance(entry, dict) or "method" not in entry:
            raise ValueError(
                f"attribution.methods entry {entry!r} must be a method name or a mapping with "
                "keys name, method and args"
            )
        unknown = set(entry) - {"name", "method", "args"}
        if unknown:
            raise ValueError(f"attribution.methods entry {entry!r}: unknown keys {sorted(unknown)}")
        method = get(entry["method"])
        name = str(entry.get("name", entry["method"]))
        specs.append(MethodSpec(name, method, method.make_args(entry.get("args") or {})))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"attribution.methods names must be unique, got {names}")
    return specs


def get(name: str) -> Method:
    """The registered method of that name (ValueError with the valid names otherwise)."""
    if name not in REGISTRY:
        hint = difflib.get_close_matches(str(name), list(REGISTRY), n=1)
        mean = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ValueError(f"unknown method {name!r}{mean}; valid: {', '.join(REGISTRY)}")
    return REGISTRY[name]


for _method in _BUILT_IN:
    register(_method)

__all__ = [
    "REGISTRY",
    "Method",
    "MethodInputs",
    "MethodSpec",
    "get",
    "register",
    "resolve_specs",
    "unregister",
]
