"""Offline datasets in MVTec AD layout (ELPV solar cells, textures with drawn defects), and their CLI.

:func:`make_tiny_mvtec` writes one tiny texture category in under a second: enough to try the plugin.
"""

from anomalib_contnet.data.elpv import ELPV_CATEGORIES, prepare_elpv
from anomalib_contnet.data.layout import MANIFEST_NAME, DatasetPrepareError
from anomalib_contnet.data.textures import TEXTURE_CATEGORIES, make_tiny_mvtec, prepare_textures

__all__ = [
    "ELPV_CATEGORIES",
    "MANIFEST_NAME",
    "TEXTURE_CATEGORIES",
    "DatasetPrepareError",
    "make_tiny_mvtec",
    "prepare_elpv",
    "prepare_textures",
]
