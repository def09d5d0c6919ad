"""The top layer: the `distill` CLI (one module per command: cmd_shards, cmd_cache, cmd_train, cmd_compress,
cmd_deploy, cmd_pipeline; cli_common holds the exit-code rule), config loading, the pipeline, and the operations
files (k8s/, prometheus/, grafana/, Dockerfile, ray-up.yaml). No stage imports it.
"""
