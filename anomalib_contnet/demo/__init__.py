"""The offline end-to-end demo: data, ConTNetPaDiM fit and scores, OpenVINO export, a report with figures."""

from anomalib_contnet.demo.pipeline import DemoError, DemoOptions, run_demo

__all__ = ["DemoError", "DemoOptions", "run_demo"]
