"""Side-by-side benchmark of ConTNetPaDiM and anomalib's Padim / Patchcore on the same offline data."""

from anomalib_contnet.evaluation.configs import DEFAULT_CONFIG_NAMES, MODEL_CONFIGS, ModelConfig
from anomalib_contnet.evaluation.runner import BenchmarkError, BenchmarkReport, run_benchmark
from anomalib_contnet.evaluation.table import CSV_COLUMNS, BenchmarkRow

__all__ = [
    "CSV_COLUMNS",
    "DEFAULT_CONFIG_NAMES",
    "MODEL_CONFIGS",
    "BenchmarkError",
    "BenchmarkReport",
    "BenchmarkRow",
    "ModelConfig",
    "run_benchmark",
]
