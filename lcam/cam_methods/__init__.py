"""CAM methods the papers compare L-CAM with (SPEC section 5), one module each, in a registry.

Every module of this package is imported here, and each method registers itself with
:func:`register`, so adding a method is adding one module (see :mod:`.base` for the
contract and :mod:`.xgradcam` for a whole example). Nothing here imports torch at
import time: the CLI lists methods and options without it.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import (
    COST_CLASSES,
    CAMMethod,
    Option,
    build_method,
    default_methods,
    int_list,
    method_class,
    method_classes,
    method_names,
    register,
    unregister,
)
from .lcam_method import LCAMMethod

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "COST_CLASSES",
    "CAMMethod",
    "LCAMMethod",
    "Option",
    "build_method",
    "default_methods",
    "int_list",
    "method_class",
    "method_classes",
    "method_names",
    "register",
    "unregister",
]
