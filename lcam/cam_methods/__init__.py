"""CAM methods the papers compare L-CAM with (SPEC section 5), one module each, in a registry.

Every module of this package is imported here, and each method registers itself with
:func:`register`, so adding a method is adding one module (see :mod:`.base` for the
contract and :mod:`.xgradcam` for a whole example). Nothing here imports torch at
import time: the CLI lists methods and options without it.
"""

from __future__ import annotations

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
