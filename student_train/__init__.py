"""Student training (`distill train`): many variants from one teacher cache, DeepSpeed inside each worker.

`config` + `variant` (what to train), `losses` (registered loss terms; a mode is a recipe of them), `twins` (the
undistilled twin of each recipe), `job_plan` (check shards against the cache before any step), `data` (shard + cache
file streamed side by side), `groups` (students that share a stream), `train_loop` (one group, any launcher),
`checkpoints`, `ray_runner` (Ray Tune + Ray Train), `run`, `leaderboard`, `status`.
"""
