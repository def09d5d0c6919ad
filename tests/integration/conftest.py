import pytest


@pytest.fixture()
def s3(monkeypatch, tmp_path):
    """A real S3 API server (moto, its own process) on 127.0.0.1 with buckets `shards` and `cache`, this process's
    client pointed at it: (endpoint, the server's request log and hooks)."""
    from s3_server import S3_ENV, s3_server

    from distill.core import object_store

    with s3_server() as (endpoint, requests):
        # a cache in object storage keeps its MLflow store in ./mlruns by default: here, not in the checkout
        (tmp_path / "mlruns").mkdir(exist_ok=True)
        for k, v in {**S3_ENV, "AWS_ENDPOINT_URL": endpoint, "DISTILL_MIRROR_DIR": str(tmp_path / "mirror"),
                     "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"}.items():
            monkeypatch.setenv(k, v)
        object_store.reset_filesystem()
        object_store.filesystem().mkdir("s3://shards")
        object_store.filesystem().mkdir("s3://cache")
        yield endpoint, requests
        requests.before.clear()
        requests.after.clear()
        object_store.reset_filesystem()


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray cluster on 127.0.0.1 with 2 CPUs, shared by the session's tests."""
    import ray

    from distill.core.ray_cluster import connect_ray

    started = connect_ray(None, num_cpus=2)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def kd_data(tmp_path_factory):
    """Real MNIST shards (4 train x 60, 1 val x 40) and their cache from a small real teacher (in-process).
    Shared by the session: tests read it, and write what they make under their own tmp_path."""
    from helpers import cache_cfg_dict, mnist_shard, save_teacher

    from distill.teacher_cache.config import CacheConfig
    from distill.teacher_cache.run import run

    root = tmp_path_factory.mktemp("kd")
    for i in range(4):
        mnist_shard(root / "shards" / f"train-{i:06d}.tar", 60, offset=60 * i)
    mnist_shard(root / "shards" / "val-000000.tar", 40, offset=1000)
    ckpt = save_teacher(root / "teacher.pt")
    cfg = cache_cfg_dict([str(root / "shards" / "*.tar")], str(root / "cache"), str(ckpt))
    res = run(CacheConfig.model_validate(cfg))
    assert res.status == "success"
    teacher = cfg["teacher"]
    return {"root": root, "cache_root": root / "cache", "cache_dir": res.cache_dir, "teacher": teacher,
            "train": [str(root / "shards" / "train-*.tar")], "val": [str(root / "shards" / "val-*.tar")]}


def train_cfg(kd_data, run_dir, **over):
    d = {"run_dir": str(run_dir),
         "data": {"train_shards": kd_data["train"], "val_shards": kd_data["val"],
                  "cache_root": str(kd_data["cache_root"]), "loader_workers": 0, "shuffle_buffer": 16},
         "teacher": kd_data["teacher"],
         "base": {"arch": "cnn_small", "arch_kwargs": {"width": 4}, "epochs": 1, "batch_size": 32},
         "ray": {"enabled": False}, "log_every": 50, "metrics_port": None,
         "twins": False}  # tests of twins turn them on
    d.update(over)
    return d
