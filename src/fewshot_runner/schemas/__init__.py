"""Dataclass schemas of the config groups a user chooses from (``data``, ``backbone``, ``algo``,
``optimizer``), one module per family; :mod:`fewshot_runner.config` stores them in Hydra's ConfigStore.

A schema is a dataclass whose fields carry a comment each (``fewshot train --help`` shows them),
decorated with ``@register(group, name)``; ``conf/<group>/<name>.yaml`` extends it with
``defaults: [/schema/<group>/<name>]``.  A new family adds a module here: :func:`all_schemas`
imports every module of this package, so no list elsewhere needs editing.  No torch here:
importing the schemas must stay cheap.
"""

from __future__ import annotations

import importlib
import pkgutil

_REGISTRY: dict[tuple[str, str], type] = {}


def register(group: str, name: str):
    """Class decorator: ``cls`` is the schema of ``<group>=<name>`` (stored as ``schema/<group>/<name>``)."""

    def wrap(cls: type) -> type:
        key = (group, name)
        if key in _REGISTRY and _REGISTRY[key] is not cls:
            raise RuntimeError(f"two schemas for {group}={name}: {_REGISTRY[key].__name__} and {cls.__name__}")
        _REGISTRY[key] = cls
        return cls

    return wrap


def all_schemas() -> dict[tuple[str, str], type]:
    """Every registered schema by (group, name), after importing every module of this package."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    return dict(_REGISTRY)
