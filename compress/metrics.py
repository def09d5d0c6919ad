"""Prometheus metrics of the compress stage."""

from __future__ import annotations

from prometheus_client import Gauge

DURATION = Gauge("distill_compress_duration_seconds", "Wall time of the last compress run")
VAL_TOP1 = Gauge("distill_compress_val_top1_ratio", "ONNX Runtime val top-1 per compression stage",
                 ["student", "stage"])
LATENCY = Gauge("distill_compress_latency_seconds", "Median ONNX Runtime latency per call", ["student", "stage",
                                                                                            "batch"])
SIZE = Gauge("distill_compress_model_bytes", "Model file size", ["student", "stage"])
