"""Make the stock ``anomalib`` command see the ConTNetPaDiM plugin.

anomalib 2.7 reads no entry points; it finds models among the already imported
subclasses of ``AnomalibModule``. :func:`install` runs at interpreter start (from
``anomalib_contnet_autoload.pth``, or its PEP 829 twin ``.start`` on Python 3.15+,
which then skips the ``.pth``); it imports nothing heavy, only watches for
``anomalib.models`` and imports ``anomalib_contnet`` right after it loads. It is
idempotent; ``ANOMALIB_CONTNET_NO_AUTOLOAD=1`` turns it off.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import warnings
from collections.abc import Sequence
from types import ModuleType

WATCHED_MODULE = "anomalib.models"


class _RegisterAfterLoad(importlib.abc.Loader):
    """Wraps the real loader of ``anomalib.models``; imports the plugin once it has run."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.inner.exec_module(module)
        try:
            import anomalib_contnet  # noqa: F401, PLC0415  (registration is the import's side effect)
        except Exception as error:  # noqa: BLE001  (anomalib itself must keep working)
            warnings.warn(
                f"anomalib-contnet is installed but failed to load ({error!r}); ConTNetPaDiM is unavailable. "
                "Reinstall the package, or set ANOMALIB_CONTNET_NO_AUTOLOAD=1 to silence this.",
                RuntimeWarning,
                stacklevel=2,
            )


class _WatchAnomalibModels(importlib.abc.MetaPathFinder):
    """Finds ``anomalib.models`` through the other finders and wraps its loader."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != WATCHED_MODULE:
            return None
        sys.meta_path.remove(self)  # one shot: later imports go straight to the normal finders
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _RegisterAfterLoad(spec.loader)
        return spec


def install() -> None:
    """Install the watcher unless disabled or already done."""
    if os.environ.get("ANOMALIB_CONTNET_NO_AUTOLOAD") == "1":
        return
    if WATCHED_MODULE in sys.modules or any(isinstance(f, _WatchAnomalibModels) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _WatchAnomalibModels())
