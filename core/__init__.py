"""What every stage uses, and nothing stage-specific: the building blocks under the cache, training, compress,
deploy and the CLI (imports point into `core`, never out of it).

- `models`         the architecture registry, `create_model(name, num_classes, in_chans)` (timm-style), and the
                   small registered students/teachers
- `config`         the one strict pydantic base of every stage config, `PathOrURL`, `MetricsConfig`
- `errors`         the one exception base (`DistillError`) and its marker for "your input is wrong" (exit 2)
- `devices`        which torch device a stage runs on (`device: auto|cpu|cuda`)
- `graceful_stop`  SIGTERM (`ray job stop`, `kubectl delete`) as an exception every stage unwinds through
- `ray_cluster`    joining a Ray cluster (or a local one on loopback), and refusing requests it can never place
- `metrics_server` a process's Prometheus /metrics endpoint and its file_sd scrape target
- `storage`        one storage layer for every stage: a local directory or an `s3://` prefix behind one `Store`
                   (publish by rename or content-addressed upload, flock or a fenced lease lock, the manifest's
                   journal, a verified mirror per manifest version), and input files wherever they are
- `object_store`   the `s3://` requests themselves (fsspec/s3fs): listing, single-GET reads, conditional writes
- `atomic_io`      the one crash-safe write (temp + fsync + rename + directory fsync), temp sweeps, checksums
- `run_phase`      whether a command's work has begun: an error before it is bad input (exit 2), after it a
                   failure during the run (exit 6)
- `hooks_for_tests` every hook a test uses to reach inside a real run (injected faults, the training hold);
                   inert unless a test switches it on
"""
