"""Token batches from a prepared dataset directory, read through memory maps.

The directory format is `contracts.dataset`'s (written by `python -m data_prep`): `meta.json`
names the token dtype, the vocabulary size and, per split, the shard files; each shard is a flat
little-endian array of token ids with end-of-text between documents.

Each shard is cut into non-overlapping windows of `seq_len + 1` tokens (inputs are the first
`seq_len`, targets the last `seq_len`). Every epoch the windows are shuffled with a seeded
permutation and dealt round-robin to the ranks, so ranks never see the same window and every
rank gets the same number of windows. The loader's position is two integers (epoch, cursor),
which is what a checkpoint needs to resume on exactly the next batch. `DeviceBatches` puts the
batches on the device: on a GPU pinned, one micro-batch ahead, copied on a side stream.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from contracts.dataset import DatasetMeta, read_dataset_meta


class TokenWindows:
    """Random access to the `seq_len + 1`-token windows of one split."""

    def __init__(self, data: str | Path | DatasetMeta, split: str, seq_len: int,
                 vocab_size: int | None = None):
        self.meta = data if isinstance(data, DatasetMeta) else read_dataset_meta(data)
        dtype = np.dtype(self.meta.dtype).newbyteorder("<")
        self.seq_len = seq_len
        self.shards: list[np.memmap] = []
        for path in self.meta.shard_paths(split):
            if not path.is_file():
                raise FileNotFoundError(f"shard {path} listed in meta.json is missing")
            if path.stat().st_size % dtype.itemsize:
                raise ValueError(f"shard {path} is truncated: size is not a multiple of {dtype.name}")
            shard = np.memmap(path, dtype=dtype, mode="r")
            if vocab_size is not None and len(shard) and int(shard.max()) >= vocab_size:
                raise ValueError(
                    f"shard {path} has token id {int(shard.max())} >= vocab_size {vocab_size}: "
                    "the shards do not match this tokenizer/model"
                )
            self.shards.append(shard)
        counts = [max(0, (len(s) - 1) // seq_len) for s in self.shards]
        self.offsets = np.cumsum([0, *counts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        shard = int(np.searchsorted(self.offsets, i, side="right") - 1)
        start = (i - int(self.offsets[shard])) * self.seq_len
        return np.asarray(self.shards[shard][start : start + self.seq_len + 1], dtype=np.int64)


class BatchLoader:
    """Deals shuffled windows to one rank, `micro_batch_size` at a time, resumably."""

    def __init__(
        self, windows: TokenWindows, micro_batch_size: int, rank: int, world_size: int,
        seed: int, shuffle: bool = True,
    ):
        self.windows, self.micro_batch_size = windows, micro_batch_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.per_rank = len(windows) // world_size
        if self.per_rank < micro_batch_size:
            raise ValueError(
                f"the split has {len(windows)} windows of {windows.seq_len + 1} tokens, "
                f"{self.per_rank} per rank for {world_size} ranks: too few for micro_batch_size="
                f"{micro_batch_size}; prepare more data or lower seq_len / micro_batch_size"
            )
        self.epoch, self.cursor = 0, 0
        self._order = self._rank_order()

    def _rank_order(self) -> np.ndarray:
        n = len(self.windows)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)
        return order[self.rank :: self.world_size][: self.per_rank]

    def next_windows(self, pin: bool = False) -> torch.Tensor:
        """The next micro-batch of whole windows, [micro_batch_size, seq_len + 1] int64; in
        pinned (page-locked) memory with `pin`, ready for an asynchronous copy to a GPU."""
        if self.cursor + self.micro_batch_size > self.per_rank:
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._rank_order()
        idx = self._order[self.cursor : self.cursor + self.micro_batch_size]
        self.cursor += self.micro_batch_size
        windows = [self.windows[int(i)] for i in idx]
        if not pin:
            return torch.from_numpy(np.stack(windows))
        batch = torch.empty((len(windows), self.windows.seq_len + 1), dtype=torch.int64,
                            pin_memory=True)
        np.stack(windows, out=batch.numpy())  # straight into pinned memory, no extra copy
        return batch

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (inputs, targets) micro-batch, each [micro_batch_size, seq_len] int64."""
        batch = self.next_windows()
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._rank_order()


class CudaStreams:
    """A side CUDA stream for the batch copies, and the hand-over to the compute stream."""

    def __init__(self, device: torch.device):
        self.device, self.stream = device, torch.cuda.Stream(device)

    def side(self):
        return torch.cuda.stream(self.stream)

    def hand_over(self, *tensors: torch.Tensor) -> None:
        """The compute stream waits for the copies, and owns their memory from now on."""
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self.stream)
        for t in tensors:
            t.record_stream(current)


class DeviceBatches:
    """A loader's micro-batches on `device`, one micro-batch ahead.

    On a GPU each micro-batch is built in pinned memory and copied with `non_blocking` on a
    side stream, one micro-batch before it is used, so the copy overlaps the step before; the
    compute stream waits for it on the device, never the host. On a CPU the loader's tensors
    are used as they are (pinning and copying would only cost).

    `state_dict` is the loader's position before the micro-batch held ahead, so a checkpoint
    resumes on exactly the next batch the step would have used.
    """

    def __init__(self, loader: BatchLoader, device: torch.device, streams=None):
        self.loader, self.device = loader, device
        self.streams = streams if streams is not None else (
            CudaStreams(device) if device.type == "cuda" else None)
        self._ahead: tuple[dict, tuple[torch.Tensor, torch.Tensor]] | None = None

    def _fetch(self) -> tuple[dict, tuple[torch.Tensor, torch.Tensor]]:
        state = self.loader.state_dict()
        host = self.loader.next_windows(pin=self.device.type == "cuda")
        with self.streams.side():
            batch = host.to(self.device, non_blocking=True)
            pair = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
        return state, pair

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (inputs, targets) micro-batch, on the device."""
        if self.streams is None:
            return self.loader.next()
        if self._ahead is None:
            self._ahead = self._fetch()
        _, pair = self._ahead
        self.streams.hand_over(*pair)  # before the next copy is queued: wait for this one only
        self._ahead = self._fetch()  # the next copy runs on the side, beside this step's work
        return pair

    def state_dict(self) -> dict:
        return self._ahead[0] if self._ahead is not None else self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._ahead = None
        self.loader.load_state_dict(state)
