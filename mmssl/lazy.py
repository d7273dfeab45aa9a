"""Package namespaces whose names load on first use (PEP 562).

Why: the command-line parser and the quickstart import light leaf modules (`mmssl.data.urls`,
`mmssl.models.refs`); a package `__init__` that imported its heavy siblings eagerly would load
torch before the quickstart sets OMP_WAIT_POLICY, and slow every `mmssl --help`.
"""
from __future__ import annotations

import importlib


def lazy_names(package: str, homes: dict, namespace: dict):
    """A module `__getattr__` that imports `package.<homes[name]>` when `name` is first used."""
    def __getattr__(name):
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{homes[name]}"), name)
        namespace[name] = value
        return value

    return __getattr__
