"""Name -> class registries for models (LightningModules) and data (LightningDataModules).

    @register_model("mlp", chapter="1-2 MLPs and optimisation", description="...",
                    smoke={"model": {"hidden": [16]}, "data": {"name": "digits"}})
    class MLPClassifier(ClassifierModule): ...

`smoke` is the tiny config the test-suite uses to build the model and push one batch through it,
so every registered model is tested automatically. `load_all()` imports every chapter and data
module, which is what fills the registries.
"""

from __future__ import annotations

import os
import re
import importlib
from dataclasses import dataclass, field
from typing import Any

from litlab.errors import ConfigError, unknown_name

# Modules whose import registers things; chapters are added here as they are written.
_REGISTERING_MODULES = (
    "litlab.data",
    "litlab.chapters",
)


@dataclass(frozen=True)
class Entry:
    name: str
    cls: type
    description: str
    chapter: str = ""
    smoke: dict[str, Any] = field(default_factory=dict)


MODELS: dict[str, Entry] = {}
DATA: dict[str, Entry] = {}


def _register(table: dict[str, Entry], kind: str, name: str, **meta):
    def deco(cls):
        if name in table and table[name].cls is not cls:
            raise RuntimeError(f"{kind} {name!r} registered twice: {table[name].cls} and {cls}")
        table[name] = Entry(name=name, cls=cls, **meta)
        cls.registry_name = name
        return cls

    return deco


def register_model(name: str, *, chapter: str, description: str, smoke: dict | None = None):
    """Register a LightningModule under `name` (the value of `model.name` in a config)."""
    return _register(MODELS, "model", name, chapter=chapter, description=description, smoke=smoke or {})


def register_data(name: str, *, description: str):
    """Register a LightningDataModule under `name` (the value of `data.name` in a config)."""
    return _register(DATA, "data", name, description=description)


def load_all() -> None:
    for mod in _REGISTERING_MODULES:
        importlib.import_module(mod)


ALLOW_IMPORT_ENV = "LITLAB_ALLOW_IMPORT"  # set by `litlab run/resume/sweep --allow-import`
IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def _import_entry(table: dict[str, Entry], key: str, path: str) -> Entry:
    """`package.module:ClassName`: import the user's module (only with --allow-import) and use the
    class, registered under that path if its module did not register it itself."""
    if os.environ.get(ALLOW_IMPORT_ENV) != "1":
        raise ConfigError(key, f"{path!r} names code to import; a config may name only registered classes "
                               "(see `litlab models`) unless you trust it and pass --allow-import")
    module_name, class_name = path.split(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(key, f"cannot import {path!r}: {e}") from None
    for entry in table.values():
        if entry.cls is cls:
            return entry
    table[path] = Entry(name=path, cls=cls, description=(cls.__doc__ or "").strip().split("\n")[0], chapter="user")
    return table[path]


def _lookup(table: dict[str, Entry], key: str, name: Any) -> Entry:
    load_all()
    if isinstance(name, str) and name not in table and IMPORT_PATH.match(name):
        return _import_entry(table, key, name)
    if not isinstance(name, str) or name not in table:
        raise unknown_name(key.split(".")[0], name, table)
    return table[name]


def get_model(name: Any) -> Entry:
    return _lookup(MODELS, "model.name", name)


def get_data(name: Any) -> Entry:
    return _lookup(DATA, "data.name", name)
