"""Modules loaded on first use (``importlib.util.LazyLoader``)."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType


def lazy_import(name: str) -> ModuleType:
    """Module ``name``, executed on its first attribute access rather than now. The core holds
    :mod:`bayesprune._torch_pruning` this way, so that ``import bayesprune`` does not import
    Torch-Pruning (whose op counter imports timm when timm is installed, and timm torchvision)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None:  # pragma: no cover - a broken installation
        raise ImportError(f"no module named {name!r}")
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module
