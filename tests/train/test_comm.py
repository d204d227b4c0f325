"""train.parallel.comm's reduce-scatter: gloo's all-to-all and local sum give what gloo's own
reduce_scatter_tensor gives, along any dimension."""

import json

import torch
import torch.distributed as dist

from train.parallel.comm import Comm, reduce_scatter
from train.parallel.procs import spawn


def scatter_both_ways(rank: int, out: str) -> None:
    torch.manual_seed(rank)
    x = torch.randn(4, 6, 5)
    mine, gloos = torch.empty(2, 6, 5), torch.empty(2, 6, 5)
    reduce_scatter(mine, x)
    dist.reduce_scatter_tensor(gloos, x)
    along_1 = Comm(dist.group.WORLD).reduce_scatter_raw(x, 1)
    every = [torch.empty_like(x) for _ in range(2)]
    dist.all_gather(every, x)
    total = every[0] + every[1]
    result = {"same_as_gloo": torch.equal(mine, gloos),
              "dim0_is_my_rows": torch.equal(mine, total.chunk(2, 0)[rank]),
              "dim1_is_my_columns": torch.equal(along_1, total.chunk(2, 1)[rank]),
              "dim1_shape": list(along_1.shape)}
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)


def test_reduce_scatter_on_gloo_equals_gloos_own(tmp_path):
    spawn(scatter_both_ways, 2, str(tmp_path / "rs"))
    for rank in range(2):
        r = json.loads((tmp_path / f"rs.{rank}").read_text())
        assert r == {"same_as_gloo": True, "dim0_is_my_rows": True, "dim1_is_my_columns": True,
                     "dim1_shape": [4, 3, 5]}
