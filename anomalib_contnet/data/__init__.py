"""Offline datasets in MVTec AD layout (ELPV solar cells, textures with drawn defects), and their CLI."""

from anomalib_contnet.data.layout import MANIFEST_NAME, DatasetPrepareError, PreparedCategory
from anomalib_contnet.data.prepare import (
    DEFECT_TYPES,
    ELPV_CATEGORIES,
    TEXTURE_CATEGORIES,
    make_tiny_mvtec,
    prepare_elpv,
    prepare_textures,
)

__all__ = [
    "DEFECT_TYPES",
    "ELPV_CATEGORIES",
    "MANIFEST_NAME",
    "TEXTURE_CATEGORIES",
    "DatasetPrepareError",
    "PreparedCategory",
    "make_tiny_mvtec",
    "prepare_elpv",
    "prepare_textures",
]
