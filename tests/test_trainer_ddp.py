"""torchrun --nproc_per_node 2 on CPU (gloo): the distributed run equals one process on the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).parent / "ddp_worker.py"


@pytest.mark.multiprocess
def test_two_processes_equal_one_on_the_same_global_batch(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    completed = subprocess.run(
        [*command, str(WORKER), str(tmp_path / "ddp"), "2"], env=env, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr[-4000:]

    sys.path.insert(0, str(WORKER.parent))
    from ddp_worker import LOGGED, run

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(str(tmp_path / "single"), 4)
    finally:
        torch.set_num_threads(threads)

    ddp = json.loads((tmp_path / "ddp" / "result.json").read_text())
    single = json.loads((tmp_path / "single" / "result.json").read_text())
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    for key in LOGGED:
        assert len(ddp[key]) == 3, key
        assert ddp[key] == pytest.approx(single[key], rel=1e-5), key
    ddp_weights = load_file(tmp_path / "ddp" / "weights.safetensors")
    single_weights = load_file(tmp_path / "single" / "weights.safetensors")
    assert ddp_weights.keys() == single_weights.keys() and any(k.startswith("projectors.") for k in ddp_weights)
    for name, tensor in single_weights.items():
        torch.testing.assert_close(ddp_weights[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
