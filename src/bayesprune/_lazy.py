"""Modules imported on first use."""

from __future__ import annotations

import importlib
from types import ModuleType


class LazyModule:
    """Stands for the module ``name`` and imports it at the first attribute access.

    The core holds :mod:`bayesprune._torch_pruning` this way, so that ``import bayesprune`` does
    not import Torch-Pruning (whose op counter imports timm when timm is installed, and timm
    torchvision). Nothing is put in ``sys.modules`` before that first access, so code that walks
    ``sys.modules`` (timm's import does) cannot start the import half-way through its own
    (``importlib.util.LazyLoader`` left the module without its attributes in that case)."""

    def __init__(self, name: str) -> None:
        self.__dict__["_name"] = name
        self.__dict__["_module"] = None

    def _load(self) -> ModuleType:
        if self.__dict__["_module"] is None:
            self.__dict__["_module"] = importlib.import_module(self.__dict__["_name"])
        return self.__dict__["_module"]

    def __getattr__(self, attr: str):
        return getattr(self._load(), attr)

    def __setattr__(self, attr: str, value) -> None:  # monkeypatching in tests reaches the module
        setattr(self._load(), attr, value)

    def __delattr__(self, attr: str) -> None:
        delattr(self._load(), attr)

    def __repr__(self) -> str:
        state = "imported" if self.__dict__["_module"] is not None else "not imported yet"
        return f"<lazy module {self.__dict__['_name']!r} ({state})>"


def lazy_import(name: str) -> LazyModule:
    """:class:`LazyModule` for ``name``: imported at its first attribute access, not now."""
    return LazyModule(name)
