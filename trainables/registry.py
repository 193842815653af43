"""Methods by name: adding one is one file in trainables/ plus one line here."""
from __future__ import annotations

import importlib

_MODULES = {
    "darl": "trainables.darl",
}


def names() -> list[str]:
    return sorted(_MODULES)


def get(name: str):
    """Returns the method class (with `.config_cls`) registered under `name`."""
    if name not in _MODULES:
        raise ValueError(f"unknown method {name!r}; expected one of: {', '.join(names())}")
    return importlib.import_module(_MODULES[name]).Method
