"""Methods by name: adding one is one file in trainables/ plus one line here."""
from __future__ import annotations

import importlib

# name -> "module:class". A module may hold more than one variant (cala: Heuristic and Meta).
_METHODS = {
    "darl": "trainables.darl:Method",
    "ricasso": "trainables.ricasso:Method",
    "rna": "trainables.rna:Method",
    "cala": "trainables.cala:HeuristicMethod",
    "cala_meta": "trainables.cala:MetaMethod",
    "open_sampling": "trainables.open_sampling:Method",
    "ce": "trainables.baselines:CrossEntropy",
    "la": "trainables.baselines:LogitAdjustment",
    "oe": "trainables.baselines:OutlierExposure",
    "energy_oe": "trainables.baselines:EnergyOE",
    "pascl": "trainables.pascl:Method",
    "cocl": "trainables.cocl:Method",
    "eat": "trainables.eat:Method",
}


def names() -> list[str]:
    return sorted(_METHODS)


def get(name: str):
    """Returns the method class (a trainables.method.Method subclass) registered under `name`."""
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of: {', '.join(names())}")
    module, _, cls = _METHODS[name].partition(":")
    return getattr(importlib.import_module(module), cls)
