"""Evaluation metrics as plug-ins: :mod:`.base` holds the contract; every other module of
this package is imported here and registers one metric (adding a metric is one module)."""

from __future__ import annotations

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
