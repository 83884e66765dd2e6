"""Make anomalib's name-based look-ups find this plugin's classes: ``ConTNetPaDiM``, and the ``MVTec`` alias.

anomalib 2.7 resolves ``get_model({"class_path": "X"})`` (and so ``anomalib
benchmark``) as an attribute of ``anomalib.models``, and ``get_datamodule`` as an
attribute of ``anomalib.data``; it reads no entry points. Publishing our classes
there is the only way its stock tools can name them without a dotted path.
``anomalib.models.get_model("ConTNetPaDiM")`` and the CLI's ``--model
ConTNetPaDiM`` need nothing more than the class being imported, since they look
at the subclasses of ``AnomalibModule``.

``MVTec`` is anomalib 1.x's name for the MVTec AD datamodule. Users (and many
tutorials) write ``anomalib train --data MVTec``; anomalib 2.x renamed the class
to ``MVTecAD``. The subclass here changes nothing but the name, so both
spellings select the same datamodule.
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
