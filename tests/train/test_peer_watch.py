"""PeerWatch names the rank whose heartbeat stood still when a collective timed out (the 2-process
run with a stopped rank is in tests/faults/test_launch_faults.py, slow tier)."""

import socket
from datetime import timedelta

import pytest
import torch.distributed as dist

from train.distributed import PeerLost, PeerWatch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def store(monkeypatch):
    """A key-value store like the one torchrun's agent serves, at MASTER_ADDR:MASTER_PORT."""
    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=10),
                           wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    return server


def test_a_timeout_names_the_rank_whose_heartbeat_stood_still(store):
    watch = PeerWatch(rank=0, world=3, timeout_s=5)
    watch.where = lambda: "at step 10; last good checkpoint: ckpt"
    alive = PeerWatch(rank=2, world=3, timeout_s=5)  # beats on (its own thread)
    assert watch.beating and alive.beating
    store.add("tokenclock/beat/1", 1)  # rank 1 beat once, then froze
    with pytest.raises(PeerLost) as lost, watch.watching():
        raise RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting "
                           "5000ms for recv operation to complete")
    assert str(lost.value) == ("rank 1 stopped answering: no reply within "
                               "collective_timeout_s=5 s, at step 10; last good checkpoint: "
                               "ckpt; stopping (resume with resume=auto)")


def test_other_errors_pass_through_and_one_rank_needs_no_watch(store):
    watch = PeerWatch(rank=0, world=2, timeout_s=5)
    with pytest.raises(RuntimeError, match="^shapes do not match$"), watch.watching():
        raise RuntimeError("shapes do not match")
    single = PeerWatch(rank=0, world=1, timeout_s=5)
    assert not single.beating
    with pytest.raises(RuntimeError, match="Timed out"), single.watching():
        raise RuntimeError("Timed out waiting 5000ms")
