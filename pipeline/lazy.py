"""Package attributes that import their module on first use (PEP 562).

A package's `__init__` runs whenever one of its modules is imported, so `import pipeline.models.config`
would import torch if `pipeline/models/__init__.py` imported the backbones. The packages whose config
module is read at load time (data, methods, models, optim) expose their torch-backed names through this.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_attributes(package: str, where: dict[str, str]) -> Callable[[str], object]:
    """A module `__getattr__` for `package`; `where` maps each lazy name to its module (`.backbone`)."""

    def __getattr__(name: str) -> object:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(where[name], package), name)

    return __getattr__
