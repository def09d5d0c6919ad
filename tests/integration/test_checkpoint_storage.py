"""Checkpoints on node-local disks (issue 21 §7): two ranks that do not see each other's checkpoint directory.

Two real processes launched the way torchrun launches them (RANK, WORLD_SIZE, MASTER_ADDR/PORT), each its own
"node": LOCAL_RANK 0, its own working directory, and a relative run_dir, so each rank writes its checkpoints to
its own disk, as on two machines with local SSDs. Before the fix, rank 0 sealed only what it saw, rank 1 found
no sealed tag in its own directory (and no model states: DeepSpeed wrote those on rank 0 only), the ranks agreed
on no tag, and the second launch silently trained from epoch 0 again.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pandas as pd
import pytest
import yaml
from conftest import train_cfg

pytestmark = pytest.mark.integration


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(cfg_path, nodes, epochs: int) -> list[str]:
    port = _port()
    procs = []
    for rank, node in enumerate(nodes):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "distill", "train", "-c", str(cfg_path),
                                       "--variant", "dp", "--set", f"base.epochs={epochs}"], cwd=node, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    return outs


def test_resume_when_each_rank_has_its_own_checkpoint_disk(kd_data, tmp_path):
    cfg = train_cfg(kd_data, "run", base={"name": "dp", "arch": "cnn_small", "arch_kwargs": {"width": 4},
                                          "epochs": 1, "batch_size": 16, "zero_stage": 1})
    cfg_path = tmp_path / "train.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        node.mkdir()
    outs = _launch(cfg_path, nodes, 1)
    assert "node-local" in outs[0] + outs[1]
    for node in nodes:  # each disk holds a complete, sealed tag: model states + its rank's optimizer shard
        tag = node / "run" / "dp" / "ds_ckpt" / "epoch0"
        digests = json.loads((tag / "distill_digests.json").read_text())
        assert "mp_rank_00_model_states.pt" in digests and any("optim_states" in f for f in digests), digests
    outs = _launch(cfg_path, nodes, 2)
    assert all("resumed after epoch 1" in o for o in outs), outs[1][-3000:]
    assert pd.read_csv(nodes[0] / "run" / "dp" / "metrics.csv")["epoch"].tolist() == [1, 2]  # not [1, 1, 2]
    assert json.loads((nodes[0] / "run" / "dp" / "status.json").read_text())["status"] == "done"
