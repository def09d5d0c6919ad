"""`distill deploy` (bundle a compressed student) and `distill serve` (Ray Serve HTTP endpoint)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from distill.cluster.cli_common import config_options
from distill.cluster.config_loading import load_config
from distill.core.graceful_stop import StopRequested


@click.command()
@config_options
def deploy(config_path: Path | None, overrides: tuple[str, ...]) -> None:
    """Bundle a compressed student: fp32 + int8 ONNX, a LiteRT .tflite, preprocessing, classes, model card.

    \b
    Ships the smallest stage (deploy.pick_by: size, or batch-32 latency) on the accuracy/cost Pareto front
    within the accuracy floor deploy.max_top1_drop (default 0.01: at most 1 pt below the parent student); a named
    deploy.stage below the floor is refused with a message naming the floor. In auto mode an int8 stage
    that fails the int8/fp32 agreement check falls back to the next stage within the floor. Re-checks parity on real val
    images (fp32 ONNX vs the PyTorch model: max |dlogit| and top-1 agreement; int8 vs fp32 agreement) and
    fails beyond tolerance. Adds the smallest LiteRT model (deploy.litert_stage) within the floor whose fp32
    .tflite matches PyTorch in the LiteRT interpreter; without one the card says why. The bundle is written
    to <out_dir>.versions/<time>/ and the link <out_dir> moved to it atomically.
    Example: distill deploy --config examples/demo.yaml
    """
    from distill.deploy.bundle import run
    from distill.deploy.config import DeployConfig

    cfg = load_config(DeployConfig, config_path, list(overrides), "deploy")
    res = run(cfg)
    click.echo(json.dumps({"bundle": str(res.bundle), "student": res.student, "stage": res.stage,
                           "refused": res.refused, "parity": res.parity, "litert": res.litert,
                           "litert_reason": res.litert_reason}, indent=1))
    click.echo(f"model card: {res.card}\nserve it:   distill serve --bundle {res.bundle}")


@click.command()
@config_options
@click.option("--bundle", default=None, help="Bundle directory written by `distill deploy`.")
@click.option("--port", type=int, default=None, help="HTTP port (default 8000).")
@click.option("--host", default=None, help="Bind address (default 127.0.0.1).")
@click.option("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local cluster).")
def serve(config_path: Path | None, overrides: tuple[str, ...], bundle: str | None, port: int | None,
          host: str | None, address: str | None) -> None:
    """Serve a bundle with Ray Serve: POST /predict (image bytes) -> top-k JSON, GET /healthz.

    \b
    Example: distill serve --bundle runs/demo/bundle --port 8000
    curl -s -H 'Content-Type: image/png' --data-binary @runs/demo/bundle/sample.png http://127.0.0.1:8000/predict
    (sample.png: a held-out image that `distill deploy` puts in the bundle)
    """
    from distill.core.ray_cluster import connect_ray
    from distill.deploy.config import ServeConfig
    from distill.deploy.serve import start

    extra = [f"{k}={v}" for k, v in (("bundle", bundle), ("port", port), ("host", host)) if v is not None]
    cfg = load_config(ServeConfig, config_path, list(overrides) + extra, "serve")
    connect_ray(address)
    url = start(cfg)
    click.echo(f"serving {cfg.bundle} at {url}  (POST {url}/predict, GET {url}/healthz); Ctrl-C stops")
    try:
        while True:
            time.sleep(3600)
    except (KeyboardInterrupt, StopRequested):  # Ctrl-C or SIGTERM: shut Serve down cleanly
        pass
