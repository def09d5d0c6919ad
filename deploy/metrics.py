"""Prometheus metrics of the deploy stage."""

from __future__ import annotations

from prometheus_client import Gauge

DURATION = Gauge("distill_deploy_duration_seconds", "Wall time of the last bundle build")
PARITY = Gauge("distill_deploy_parity_max_abs_logit_diff", "max |dlogit| of fp32 ONNX vs PyTorch on val images")
