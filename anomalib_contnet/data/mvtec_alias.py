"""``MVTec``: anomalib 1.x's name for the MVTec AD datamodule, kept working on anomalib 2.x.

Users (and many tutorials) write ``anomalib train --data MVTec``; anomalib 2.x
renamed the class to ``MVTecAD``. This subclass changes nothing but the name,
so both spellings select the same datamodule.
"""

from anomalib.data import MVTecAD

__all__ = ["MVTec"]


class MVTec(MVTecAD):
    """Alias of :class:`anomalib.data.MVTecAD` under its anomalib 1.x name; see that class for arguments."""
