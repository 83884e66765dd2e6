"""Make anomalib's name-based look-ups find ``ConTNetPaDiM`` and the ``MVTec`` datamodule alias.

anomalib 2.7 reads no entry points: ``get_model({"class_path": "X"})`` (and so ``anomalib
benchmark``) looks ``X`` up on ``anomalib.models``, ``get_datamodule`` on ``anomalib.data``.
``MVTec`` is anomalib 1.x's name for ``MVTecAD``, still in many tutorials
(``anomalib train --data MVTec``); the subclass changes nothing but the name.
"""

from __future__ import annotations

import importlib

from anomalib.data import MVTecAD

from anomalib_contnet.models import ConTNetPaDiM

__all__ = ["MVTec", "register"]


class MVTec(MVTecAD):
    """Alias of :class:`anomalib.data.MVTecAD` under its anomalib 1.x name; see that class for arguments."""


def register() -> None:
    """Publish ConTNetPaDiM on ``anomalib.models`` and the MVTec alias on ``anomalib.data`` (idempotent)."""
    # import_module returns the module object even while ``anomalib.models`` is still being bound on its parent
    # package, which is the case when the autoload hook runs this right after anomalib.models has loaded.
    for module_name, cls in (("anomalib.models", ConTNetPaDiM), ("anomalib.data", MVTec)):
        module = importlib.import_module(module_name)
        existing = getattr(module, cls.__name__, None)
        if existing is not None and existing is not cls:
            msg = f"{module.__name__}.{cls.__name__} already exists and is not anomalib-contnet's; not overriding it"
            raise RuntimeError(msg)
        setattr(module, cls.__name__, cls)
