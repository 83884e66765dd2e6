"""The offline end-to-end demo: data, ConTNetPaDiM training and test, OpenVINO export, a report with figures."""

from anomalib_contnet.demo.pipeline import BACKBONE_CHOICES, DemoError, DemoOptions, DemoResult, run_demo

__all__ = ["BACKBONE_CHOICES", "DemoError", "DemoOptions", "DemoResult", "run_demo"]
