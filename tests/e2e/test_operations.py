"""End to end, operations, all real and all on 127.0.0.1: a Ray head started with `ray start`, the pipeline
submitted with `ray job submit` (token auth), stopped with `ray job stop` during the cache pass and during
training (it records "stopped" / "interrupted") and re-submitted, a real Prometheus scraping the job's file_sd
targets, a real Pushgateway, the refresh lock, and a no-op refresh. Needs the Debian packages `prometheus` and
`prometheus-pushgateway` (.ci/run installs them). The demo pipeline end to end is in test_end_to_end.py (its own
file, so that pytest-xdist runs the two long e2e files on different workers).
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from helpers import (
    PROMETHEUS,
    ShardGate,
    free_port,
    hold_training_after,
    mnist_shard,
    prom_query,
    prometheus_config,
    wait_http,
)

pytestmark = [pytest.mark.e2e, pytest.mark.cluster]
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PUSHGATEWAY = shutil.which("prometheus-pushgateway") or "/usr/bin/prometheus-pushgateway"


def _env() -> dict:
    # RAY_JOB_STOP_WAIT_TIME_S: on the head, how long `ray job stop` waits after SIGTERM before SIGKILL (3 s by
    # default; the stages need a little longer on a loaded 2-core machine to record "stopped"/"interrupted")
    return dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token",
                PATH=f"{BIN}:{os.environ['PATH']}", DS_ACCELERATOR="cpu", RAY_JOB_STOP_WAIT_TIME_S="60")


def _cluster_pids(ray_tmp: str) -> set[int]:
    """PIDs of the Ray cluster under `ray_tmp` (its own temp dir): the processes that name it on their command
    line (GCS, raylet, agents, dashboard) and everything below them (workers, the job drivers). Other Ray
    clusters on this machine (other tests, pytest-xdist workers) are left alone."""
    parents: dict[int, int] = {}
    roots = set()
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().decode(errors="ignore")
            ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents[int(p.name)] = ppid
        if ray_tmp in cmd:
            roots.add(int(p.name))
    found = set(roots)
    grew = True
    while grew:
        below = {pid for pid, ppid in parents.items() if ppid in found} - found
        found |= below
        grew = bool(below)
    return found


@pytest.fixture(scope="module")
def ops(tmp_path_factory):
    if not (Path(PROMETHEUS).exists() and Path(PUSHGATEWAY).exists()):
        pytest.skip("the Prometheus server and Pushgateway are not installed (.ci/run installs them)")
    work = tmp_path_factory.mktemp("ops")
    ray_tmp = tempfile.mkdtemp(prefix="/tmp/rop")  # short: Ray's unix sockets live under it
    dash, gcs = free_port(), free_port()
    started: list[subprocess.Popen] = []
    ports = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
             f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
             f"--ray-client-server-port={free_port()}", f"--node-manager-port={free_port()}",
             f"--object-manager-port={free_port()}"]
    subprocess.run([str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2", *ports,
                    f"--temp-dir={ray_tmp}", "--include-dashboard=true", "--disable-usage-stats"],
                   check=True, env=_env(), capture_output=True, timeout=120)
    targets = work / "metrics_targets"
    targets.mkdir()
    prom_port, push_port = free_port(), free_port()
    (work / "prometheus.yml").write_text(yaml.safe_dump(prometheus_config(targets, push_port)))
    started.append(subprocess.Popen([PROMETHEUS, f"--config.file={work / 'prometheus.yml'}",
                                     f"--web.listen-address=127.0.0.1:{prom_port}",
                                     f"--storage.tsdb.path={work / 'tsdb'}"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    started.append(subprocess.Popen([PUSHGATEWAY, f"--web.listen-address=127.0.0.1:{push_port}"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    wait_http(f"http://127.0.0.1:{prom_port}/-/ready")
    wait_http(f"http://127.0.0.1:{push_port}/metrics")
    demo = (ROOT / "examples" / "demo.yaml").read_text().replace("runs/demo", str(work / "runs"))
    cfg = yaml.safe_load(demo)
    cfg["shards"].update(limit=1200, samples_per_shard=100)
    # a cache pass that lasts long enough (12 shards one at a time, 12 views) for `ray job stop` to land in it
    # (decode_processes 0 / loader_workers 0: no spawned decode process to import torch into per actor and per
    # rank on each submission; the pools have their own tests, this one is about the Ray job path)
    cfg["cache"].update(batch_size=16, views={**cfg["cache"]["views"], "num_views": 12},
                        ray={"num_actors": 1, "cpus_per_actor": 0.5}, decode_processes=0)
    # no teacher pre-training stage here (test_end_to_end.py runs it): a real resnet_mini, saved
    del cfg["teacher"]
    from helpers import save_teacher

    cfg["cache"]["teacher"].update(arch_kwargs={"width": 8}, checkpoint=str(save_teacher(work / "teacher.pt", 8)))
    cfg["train"]["base"].update(epochs=4, batch_size=16)  # long enough for `ray job stop` to land mid-training
    cfg["train"]["data"]["loader_workers"] = 0
    # every train shard labelled (the demo's students are the nightly case, labels on one shard; the unlabelled
    # pool has its own tests): each epoch below is all 1,080 train rows for both variants
    cfg["train"]["data"].update(train_shards=[str(work / "runs" / "shards" / "train-*.tar")], unlabelled_shards=[])
    cfg["train"]["metrics_targets_dir"] = str(targets)
    cfg["train"]["teacher"] = cfg["cache"]["teacher"]
    cfg["train"]["variants"] = [{"name": "cnn-soft", "arch": "cnn_small", "arch_kwargs": {"width": 4}},
                                {"name": "cnn-noKD", "arch": "cnn_small", "arch_kwargs": {"width": 4}, "mode": "none"}]
    cfg["compress"]["prune"]["finetune_epochs"] = 1
    cfg["compress"]["latency"] = {"repeats_b1": 5, "repeats_b32": 3, "warmup": 1}
    cfg["deploy"]["int8_min_agreement"] = 0.5
    cfg["metrics"] = {"targets_file": str(targets / "pipeline.json"), "pushgateway": f"http://127.0.0.1:{push_port}"}
    (work / "pipeline.yaml").write_text(yaml.safe_dump(cfg))
    yield {"work": work, "dash": dash, "gcs": gcs, "prom": prom_port, "push": push_port, "cfg": cfg,
           "config": work / "pipeline.yaml"}
    for proc in started:
        proc.terminate()
        proc.wait(timeout=20)
    for pid in _cluster_pids(ray_tmp):  # only the Ray cluster this test started
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(ray_tmp, ignore_errors=True)


def _job(ops, *args, timeout=600):
    return subprocess.run([str(BIN / "ray"), "job", *args], env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _submit(ops) -> str:
    r = _job(ops, "submit", "--address", f"http://127.0.0.1:{ops['dash']}", "--working-dir", str(ROOT),
             "--no-wait", "--", str(BIN / "distill"), "pipeline", "--config", str(ops["config"]))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    import re

    return re.search(r"raysubmit_[A-Za-z0-9]+", r.stdout + r.stderr).group(0)


_polled: dict[str, tuple[float, str]] = {}
STATUS_EVERY_S = 2.0  # each `ray job status` is a new Python process importing ray: ~1.5 CPU-s on these machines


def _status(ops, job_id: str, fresh: bool = False) -> str:
    """The job's status from the real `ray job status` CLI; within a wait loop at most once per STATUS_EVERY_S
    (polled every 0.2 s it kept one of the two cores busy for the whole test)."""
    at, last = _polled.get(job_id, (-1e9, ""))
    if not fresh and time.monotonic() - at < STATUS_EVERY_S:
        return last
    r = _job(ops, "status", "--address", f"http://127.0.0.1:{ops['dash']}", job_id)
    text = (r.stdout + r.stderr).lower()  # the ray CLI logs to stderr: "succeeded", "was stopped", ...
    status = next((s for s in ("SUCCEEDED", "FAILED", "STOPPED", "RUNNING", "PENDING") if s.lower() in text), text)
    _polled[job_id] = (time.monotonic(), status)
    return status


def _ended(ops, job_id: str, fresh: bool = False) -> bool:
    return _status(ops, job_id, fresh) in ("SUCCEEDED", "FAILED", "STOPPED")


def _logs(ops, job_id: str) -> str:
    return _job(ops, "logs", "--address", f"http://127.0.0.1:{ops['dash']}", job_id).stdout[-4000:]


def _wait_for(pred, timeout=600, what=""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _prom(ops, query: str) -> list:
    return prom_query(ops["prom"], query)


def _dashboard_targets() -> list[tuple[str, str]]:
    dash = json.loads((ROOT / "cluster" / "grafana" / "dashboards" / "distill.json").read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]


def _unanswered_panels(ops, since: float) -> list[str]:
    """Every target of every Grafana panel, evaluated by the real Prometheus over the test's own time range (as a
    dashboard set to that range would): the ones that return no series."""
    empty = []
    for title, expr in _dashboard_targets():
        url = f"http://127.0.0.1:{ops['prom']}/api/v1/query_range?" + urllib.parse.urlencode(
            {"query": expr, "start": since, "end": time.time(), "step": 5})
        result = json.loads(urllib.request.urlopen(url, timeout=30).read())["data"]["result"]
        if not any(s["values"] for s in result):
            empty.append(f"{title}: {expr}")
    return empty


@pytest.mark.timeout(2700)  # three submissions of the whole pipeline on 2 cores beside other tests
def test_pipeline_job_killed_twice_then_completes_with_metrics(ops):
    since = time.time()
    runs = ops["work"] / "runs"
    # the shards first, as the job's own stage would write them (the job then finds them current), so that the
    # cache pass can be held: its last shard is a pipe, and the job waits inside it until the test restores it
    shards = subprocess.run([str(BIN / "distill"), "shards", "--config", str(ops["config"])], env=_env(),
                            capture_output=True, text=True, timeout=600)
    assert shards.returncode == 0, shards.stderr[-2000:]
    gate = ShardGate(sorted((runs / "shards").glob("*.tar"))[-1])
    # 1: kill during the cache pass
    job = _submit(ops)
    _wait_for(lambda: any((runs / "cache").glob("*/*.parquet")) or _ended(ops, job), what="the first cache file")
    assert not _ended(ops, job, fresh=True), _logs(ops, job)
    assert _job(ops, "stop", "--address", f"http://127.0.0.1:{ops['dash']}", job).returncode == 0
    _wait_for(lambda: _status(ops, job) in ("STOPPED", "FAILED"), 120, "the job to stop")
    # SIGTERM was handled: the cache recorded what it did and released its lock
    [summary] = list((runs / "cache").glob("*/last_run.json"))
    first = json.loads(summary.read_text())
    assert first["status"] == "stopped" and first["labelled"], (first, _logs(ops, job))
    gate.restore()
    # 2: re-submit, kill during training (every variant waits after its first epoch: the training hold)
    holds = [hold_training_after(runs / "students" / v["name"], 1) for v in ops["cfg"]["train"]["variants"]]
    job = _submit(ops)
    _wait_for(lambda: any((runs / "students").glob("*/metrics.csv")) or _ended(ops, job),
              what="a student's first epoch")
    assert not _ended(ops, job, fresh=True), _logs(ops, job)
    _job(ops, "stop", "--address", f"http://127.0.0.1:{ops['dash']}", job)
    _wait_for(lambda: _status(ops, job) in ("STOPPED", "FAILED"), 120, "the job to stop")
    for hold in holds:
        hold.release()
    states = {d.name: json.loads((d / "status.json").read_text())
              for d in (runs / "students").iterdir() if (d / "status.json").exists()}
    assert states and all(s["status"] in ("interrupted", "done") for s in states.values()), states
    assert any(s["status"] == "interrupted" and "SIGTERM" in s["reason"] for s in states.values()), states
    # 3: re-submit and let it finish
    job = _submit(ops)
    _wait_for(lambda: _status(ops, job) in ("SUCCEEDED", "FAILED", "STOPPED"), 1500, "the job to finish")
    logs = _job(ops, "logs", "--address", f"http://127.0.0.1:{ops['dash']}", job).stdout
    assert _status(ops, job, fresh=True) == "SUCCEEDED", logs[-3000:]
    # nothing lost or duplicated
    from distill.teacher_cache.locate import find_cache_dir
    from distill.teacher_cache.reader import CacheReader

    reader = CacheReader(find_cache_dir(runs / "cache"))
    keys = [k for s in reader.shards for k in reader.arrays(s).keys]
    assert len(keys) == len(set(keys)) == 1200
    board = {r["variant"]: r for r in pq.read_table(runs / "students" / "leaderboard.parquet").to_pylist()}
    assert all(r["status"] == "done" and r["epochs"] == 4 for r in board.values()), board
    for name in board:
        import pandas as pd

        m = pd.read_csv(runs / "students" / name / "metrics.csv")
        assert sorted(m["epoch"]) == [1, 2, 3, 4] and (m["train_samples"] == 1080).all()
    stage = json.loads((runs / "bundle" / "bundle.json").read_text())["stage"]
    assert (runs / "bundle" / "model.onnx").exists()
    assert (runs / "bundle" / "model.int8.onnx").exists() == ("int8" in stage)
    # Prometheus ingested the cache and training series, with sensible values (waits until it answers with them)
    for query in ("max(max_over_time(distill_cache_images_total[30m]))",
                  "max by (variant) (max_over_time(distill_train_samples_per_second[30m]))",
                  "max(max_over_time(distill_compress_duration_seconds[30m]))"):
        _wait_for(lambda q=query: _prom(ops, q), 120, f"Prometheus to answer {query}")
    images = _prom(ops, "max(max_over_time(distill_cache_images_total[30m]))")
    assert images and 0 < float(images[0]["value"][1]) <= 1200
    rates = _prom(ops, "max by (variant) (max_over_time(distill_train_samples_per_second[30m]))")
    by_variant = {r["metric"]["variant"]: float(r["value"][1]) for r in rates}
    assert set(by_variant) >= {"cnn-soft", "cnn-noKD"}
    assert all(1 < v < 1e6 for v in by_variant.values()), by_variant
    assert _prom(ops, "max(max_over_time(distill_compress_duration_seconds[30m]))")
    # every dashboard panel answers: the nightly refresh's own series (pushed) too, from a no-op refresh of this cache
    refresh = subprocess.run([str(BIN / "distill"), "cache", "refresh", "--config", str(ops["config"]), "--set",
                              "ray.enabled=false", "--set", f"metrics.pushgateway=http://127.0.0.1:{ops['push']}"],
                             env=_env(), capture_output=True, text=True, timeout=600)
    assert refresh.returncode == 0, refresh.stderr[-2000:]
    assert len(_dashboard_targets()) >= 17
    deadline = time.time() + 180  # Prometheus scrapes every second; the Pushgateway's series need one scrape
    while (empty := _unanswered_panels(ops, since)) and time.time() < deadline:
        time.sleep(1)
    assert not empty, f"dashboard panels that answer nothing: {empty}"


def test_refresh_lock_refusal_and_noop(ops):
    n = 6  # its own shards: this test does not depend on the pipeline test having written runs/shards
    shards = [mnist_shard(ops["work"] / "refresh_shards" / f"train-{i:06d}.tar", 40, offset=40 * i) for i in range(n)]
    cfg = dict(ops["cfg"]["cache"])
    cfg.update(shards=[str(shards[0].parent / "*.tar")], cache_root=str(ops["work"] / "cache_refresh"))
    cfg["views"] = {**cfg["views"], "num_views": 2}
    cfg["metrics"] = {"pushgateway": f"http://127.0.0.1:{ops['push']}"}
    f = ops["work"] / "refresh.yaml"
    f.write_text(yaml.safe_dump({"cache": cfg}))
    distill = [str(BIN / "distill"), "cache", "refresh", "--config", str(f), "--set", "ray.enabled=false"]
    # the first refresh holds the lock for as long as the second needs to meet it: it waits inside an extra last
    # shard, a pipe the test feeds afterwards (a pause at a defined point, whatever the machine's speed)
    gate = ShardGate(mnist_shard(shards[0].parent / f"train-{n:06d}.tar", 40, offset=40 * n))
    first = subprocess.Popen(distill, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: gate.readers() or first.poll() is not None, 600, "the first refresh to reach its last shard")
        assert first.poll() is None, first.communicate()[1][-3000:]
        second = subprocess.run(distill, env=_env(), capture_output=True, text=True, timeout=600)
    finally:
        gate.feed_all()
    out, err = first.communicate(timeout=300)  # (the fed pipe is gone: the no-op run reports that shard vanished)
    assert first.returncode == 0, err[-2000:]
    assert second.returncode == 5, second.stderr[-2000:]
    assert "refused:" in second.stderr and "being written by another job" in second.stderr
    summary = json.loads(out)
    assert summary["new"] == n + 1 and summary["status"] == "success"
    noop = subprocess.run(distill, env=_env(), capture_output=True, text=True, timeout=120)
    assert noop.returncode == 0
    s = json.loads(noop.stdout)
    assert (s["new"], s["changed"], s["unchanged"], s["images"]) == (0, 0, n, 0)
    pushed = urllib.request.urlopen(f"http://127.0.0.1:{ops['push']}/metrics", timeout=10).read().decode()
    assert f'distill_cache_refresh_shards{{instance="",job="distill_cache_refresh",outcome="unchanged"}} {n}' in pushed


def test_bad_address_is_one_clear_line(ops):
    r = subprocess.run([str(BIN / "distill"), "cache", "--config", str(ops["config"]), "--address",
                        "127.0.0.1:1"], env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: cannot reach the Ray cluster at 127.0.0.1:1")
    assert "RAY_AUTH_MODE=token" in lines[-1]
    no_token = subprocess.run([str(BIN / "ray"), "job", "list", "--address", f"http://127.0.0.1:{ops['dash']}"],
                              env={**_env(), "RAY_AUTH_MODE": "disabled", "HOME": str(ops["work"])},
                              capture_output=True, text=True, timeout=120)
    assert no_token.returncode != 0  # the cluster refuses a client without the token
