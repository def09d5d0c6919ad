"""Cluster manifests, Prometheus config and Grafana dashboard: load them and check what matters."""

import json
import re
from pathlib import Path

import yaml

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"


def _yaml(name):
    return yaml.safe_load((CLUSTER / name).read_text())


def _containers(pod_template):
    return pod_template["spec"]["containers"]


def test_raycluster_cpu_head_gpu_workers():
    rc = _yaml("k8s/raycluster.yaml")
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster"
    head = _containers(rc["spec"]["headGroupSpec"]["template"])[0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    assert rc["spec"]["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    gpu = rc["spec"]["workerGroupSpecs"][0]
    worker = _containers(gpu["template"])[0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert head["image"] == worker["image"] and ":" in head["image"]
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]


def test_rayjob_runs_the_pipeline_on_the_cluster():
    job = _yaml("k8s/rayjob-pipeline.yaml")
    assert job["kind"] == "RayJob"
    assert job["spec"]["entrypoint"].startswith("distill pipeline --config ")
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == _yaml("k8s/raycluster.yaml")["metadata"]["name"]


def test_nightly_refresh_schedule_and_entrypoint():
    cron = _yaml("k8s/raycronjob-refresh.yaml")
    assert cron["kind"] == "RayCronJob" and cron["apiVersion"] == "ray.io/v1"
    fields = cron["spec"]["schedule"].split()
    assert len(fields) == 5 and fields[0] == "0"  # once a day at a fixed minute
    entry = cron["spec"]["jobTemplate"]["entrypoint"]
    assert entry.startswith("distill cache refresh --config ") and "metrics.pushgateway=" in entry
    from distill.cluster.cli import cli

    assert "refresh" in cli.commands["cache"].commands  # the entrypoint names a command that exists


def test_ray_up_config():
    up = _yaml("ray-up.yaml")
    types = up["available_node_types"]
    assert up["head_node_type"] in types
    assert any(t["resources"].get("GPU", 0) >= 1 for t in types.values())
    assert any("pip install" in c for c in up["setup_commands"])


def test_prometheus_scrapes_file_sd_targets_and_pushgateway():
    prom = _yaml("prometheus/prometheus.yml")
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    assert jobs["distill"]["file_sd_configs"][0]["files"][0].endswith("/*.json")
    assert jobs["pushgateway"]["honor_labels"] is True


def _exported_names():
    """Every sample name the code can export (stage metrics modules + the refresh summary registry)."""
    from prometheus_client import REGISTRY

    import distill.compress.metrics  # noqa: F401
    import distill.deploy.metrics  # noqa: F401
    import distill.student_train.metrics  # noqa: F401
    import distill.teacher_cache.metrics as tcm

    names = set()
    registries = [REGISTRY, tcm.refresh_registry({"new": [], "changed": [], "unchanged": [], "vanished": [],
                                                  "failed": {}, "seconds": 1.0, "images": 0, "status": "success"})]
    for reg in registries:
        for fam in reg.collect():
            names.add(fam.name)
            names.update(s.name for s in fam.samples)
            if fam.type == "histogram":
                names.update(f"{fam.name}_{suffix}" for suffix in ("bucket", "count", "sum"))
            if fam.type == "counter":  # the family is named without the _total its samples carry
                names.add(f"{fam.name}_total")
    return names


def test_every_dashboard_metric_is_exported_by_the_code():
    dash = json.loads((CLUSTER / "grafana" / "dashboards" / "distill.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    used = {m for e in exprs for m in re.findall(r"\b(distill_[a-z0-9_]+)", e)}
    assert len(used) >= 10
    missing = used - _exported_names()
    assert not missing, f"dashboard queries metrics nothing exports: {sorted(missing)}"
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for needed in ("cache throughput", "shard progress", "decode errors", "last successful refresh",
                   "samples/s per variant", "loss", "validation top-1", "duration"):
        assert needed in titles, needed


def test_metric_names_follow_the_convention():
    for name in _exported_names():
        if name.startswith("distill_"):
            assert re.fullmatch(r"distill_(cache|train|compress|deploy|serve)_[a-z0-9_]+", name), name


def test_jobs_api_needs_a_token_on_kuberay():
    """The dashboard (Jobs API = remote code execution) listens on 0.0.0.0: token auth must be on (issue 10.9)."""
    rc = _yaml("k8s/raycluster.yaml")
    assert rc["spec"]["authOptions"] == {"mode": "token"}
    major, minor = (int(x) for x in rc["spec"]["rayVersion"].split(".")[:2])
    assert (major, minor) >= (2, 52), "token auth needs Ray >= 2.52"
    assert "KubeRay >= 1.5.1" in (CLUSTER / "k8s/raycluster.yaml").read_text()
    for name in ("k8s/rayjob-pipeline.yaml", "k8s/raycronjob-refresh.yaml"):
        spec = _yaml(name)["spec"]
        spec = spec.get("jobTemplate", spec)
        # a job that defines its own cluster must secure it too; ours select the long-lived one above
        assert "rayClusterSpec" not in spec or spec["rayClusterSpec"]["authOptions"] == {"mode": "token"}, name
        assert spec["clusterSelector"]["ray.io/cluster"] == rc["metadata"]["name"], name


def test_jobs_api_needs_a_token_on_ray_up_nodes():
    up = _yaml("ray-up.yaml")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in up[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), key
    assert any("RAY_AUTH_MODE=token" in c for c in up["setup_commands"])  # shells on the nodes (ray job submit)
    assert any(dst.endswith(".ray/auth_token") for dst in up["file_mounts"])  # the same token on every node


def test_readme_shows_how_to_get_the_token():
    readme = (CLUSTER.parent / "README.md").read_text()
    assert "authOptions" in readme and "RAY_AUTH_MODE=token" in readme
    assert "auth_token" in readme and "ray get-auth-token" in readme


def test_job_stop_leaves_the_stages_time_to_record_it():
    """`ray job stop` sends SIGKILL 3 s after SIGTERM unless the head says otherwise (graceful stop)."""
    head = _yaml("k8s/raycluster.yaml")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    wait = {e["name"]: e["value"] for e in head["env"]}.get("RAY_JOB_STOP_WAIT_TIME_S")
    assert wait is not None and int(wait) >= 10
    starts = [c for c in _yaml("ray-up.yaml")["head_start_ray_commands"] if "ray start" in c]
    assert starts and all("RAY_JOB_STOP_WAIT_TIME_S=" in c for c in starts)
