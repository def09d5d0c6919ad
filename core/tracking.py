"""Experiment tracking in MLflow: every stage's runs, params, per-epoch metrics and artifacts, never failing the work.

The store is `tracking.uri` from the config, else $MLFLOW_TRACKING_URI, else a local one beside the stage's output
(`<dir>/mlflow.db`, artifacts in `<dir>/artifacts`; the demo's is runs/demo/mlruns): no server is needed, and
`mlflow ui --backend-store-uri sqlite:///runs/demo/mlruns/mlflow.db` shows it. MLflow 3 keeps its file store in
maintenance mode, so the local store is its SQLite one; several processes (Ray workers) may log to it at once.

Runs are addressed by id through `MlflowClient` (never MLflow's process-global "active run"), so a Ray worker
logs to the run the driver made for its student, and a resumed student logs to the run it logged to before the
kill (`RunRef` is what travels and what is kept beside the student's outputs). Tracking is a witness, not a part
of the work: the first failure of a tracker (an unreachable server, a locked database) is one warning, and that
tracker logs nothing more for the rest of its run.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from distill.core.config import StrictConfig

log = logging.getLogger(__name__)
LOCAL_DIR = "mlruns"


class TrackingConfig(StrictConfig):
    """Where a stage records its runs (MLflow)."""

    enabled: bool = Field(True, description="false = record nothing")
    uri: str | None = Field(None, description="MLflow tracking URI (a team's server, or sqlite:///path); empty = "
                            "$MLFLOW_TRACKING_URI, else a local store beside the stage's output (<parent>/mlruns)")
    experiment: str = Field("distill", description="MLflow experiment the runs go to")


@dataclass(frozen=True)
class RunRef:
    """One MLflow run, as a worker or a later (resumed) process needs it."""

    uri: str
    run_id: str

    def save(self, path: Path) -> None:
        from distill.core.atomic_io import atomic_write

        atomic_write(path, json.dumps(asdict(self)))

    @staticmethod
    def load(path: Path) -> RunRef | None:
        try:
            return RunRef(**json.loads(Path(path).read_text()))
        except (OSError, ValueError, TypeError):
            return None


def store_uri(cfg: TrackingConfig, output: Path) -> str:
    """The tracking URI for a stage whose outputs go to `output` (a directory; its parent holds the local store)."""
    if cfg.uri:
        return cfg.uri
    if env := os.environ.get("MLFLOW_TRACKING_URI"):
        return env
    local = Path(output).absolute().parent / LOCAL_DIR
    local.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{local / 'mlflow.db'}"


def _flat(params: Mapping[str, Any]) -> dict[str, str]:
    """MLflow params are strings of at most 6,000 characters; nested values become JSON."""
    out = {}
    for k, v in params.items():
        text = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
        out[str(k)] = text[:6000]
    return out


class Tracker:
    """One MLflow run. Every method returns quietly once the tracker has failed (one warning, then silence)."""

    def __init__(self, ref: RunRef | None, client: Any = None) -> None:
        self.ref, self._client = ref, client

    @property
    def active(self) -> bool:
        return self.ref is not None

    @staticmethod
    def _client_for(uri: str) -> Any:
        # an unreachable server must cost seconds, not MLflow's default of 7 retries with back-off (minutes);
        # a user's own settings win
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow.tracking import MlflowClient

        return MlflowClient(uri)

    def _fail(self, what: str, exc: BaseException) -> None:
        log.warning("experiment tracking off for this run (%s failed: %s: %s); the work goes on", what,
                    exc.__class__.__name__, str(exc).splitlines()[0] if str(exc) else "")
        self.ref = None

    @classmethod
    def start(cls, cfg: TrackingConfig, output: Path, run_name: str, *, parent: Tracker | None = None,
              params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None,
              resume: Path | None = None) -> Tracker:
        """A new run (a child of `parent` when given), or the run saved at `resume` when it still exists there;
        the run's reference is saved at `resume` so a worker or a later process logs to the same run."""
        if not cfg.enabled:
            return cls(None)
        uri = parent.ref.uri if parent is not None and parent.ref is not None else store_uri(cfg, output)
        tracker = cls(None)
        try:
            client = cls._client_for(uri)
            old = RunRef.load(resume) if resume is not None else None
            if old is not None and old.uri == uri and _run_exists(client, old.run_id):
                tracker = cls(old, client)
                client.update_run(old.run_id, status="RUNNING")
            else:
                exp = _experiment(client, cfg.experiment, uri)
                all_tags = {"distill.version": _version(), **(tags or {})}
                if parent is not None and parent.ref is not None:
                    all_tags["mlflow.parentRunId"] = parent.ref.run_id
                run = client.create_run(exp, run_name=run_name, tags={k: str(v) for k, v in all_tags.items()})
                tracker = cls(RunRef(uri, run.info.run_id), client)
                if params:
                    tracker.log_params(params)
            if resume is not None and tracker.ref is not None:
                tracker.ref.save(resume)
        except Exception as exc:  # noqa: BLE001 - tracking never fails the work (module doc)
            tracker._fail("starting a run", exc)
        return tracker

    @classmethod
    def attach(cls, ref: RunRef | None) -> Tracker:
        """The run a driver made, in another process (a Ray worker, a torchrun rank)."""
        if ref is None:
            return cls(None)
        try:
            return cls(ref, cls._client_for(ref.uri))
        except Exception as exc:  # noqa: BLE001
            tracker = cls(ref)
            tracker._fail("connecting to the store", exc)
            return tracker

    def _call(self, what: str, fn: str, *args: Any, **kwargs: Any) -> None:
        if self.ref is None or self._client is None:
            return
        try:
            getattr(self._client, fn)(self.ref.run_id, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - tracking never fails the work
            self._fail(what, exc)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        self._call("logging params", "log_batch", params=[Param(k, v) for k, v in _flat(params).items()])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self._call("setting tags", "log_batch", tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()
                if isinstance(v, int | float) and not isinstance(v, bool) and v == v]  # NaN/None are left out
        if rows:
            self._call("logging metrics", "log_batch", metrics=rows)

    def log_artifact(self, path: Path) -> None:
        if Path(path).exists():
            self._call(f"storing {Path(path).name}", "log_artifact", str(path))

    def end(self, status: str = "FINISHED") -> None:
        """status: FINISHED, FAILED or KILLED (MLflow's run states)."""
        self._call("ending the run", "set_terminated", status=status)


def _experiment(client: Any, name: str, uri: str) -> str:
    """The experiment's id, made on first use with its artifacts beside a local store (not in the cwd)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    artifacts = None
    if uri.startswith("sqlite:///"):
        artifacts = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
    try:
        return str(client.create_experiment(name, artifact_location=artifacts))
    except Exception:  # noqa: BLE001 - another process made it meanwhile
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return str(found.experiment_id)


def _run_exists(client: Any, run_id: str) -> bool:
    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except Exception:  # noqa: BLE001 - a deleted or unknown run: start a new one
        return False


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("distill")
    except PackageNotFoundError:  # a source checkout on PYTHONPATH, not installed
        return "source"
