"""Chunk-aligned block streaming: the training order for files far larger than memory.

An epoch's order is built in three steps, each a pure function of (seed, epoch, rank, world, workers):
  1. the sorted train indices are grouped into blocks of consecutive file rows (a block is a whole number of HDF5
     chunks along the sample axis), and the blocks are shuffled;
  2. the shuffled stream is cut into ``world`` equal shares (DDP ranks; fewer than ``world`` samples are left out,
     a different few each epoch) and each share into per-worker stretches of whole batches;
  3. each worker reads its pieces with one contiguous slice read each and shuffles samples within a window of a
     few pieces before cutting batches.

Why an IterableDataset and not a batch sampler over the map-style dataset: a DataLoader hands consecutive batches to
workers round-robin, so with a sampler the samples of one block land in batches fetched by different workers and
every worker re-reads (and, for compressed files, re-decompresses) every block. Only the worker that owns a block
can read it once, and an IterableDataset is how a worker owns its data. The price, that Lightning neither shards it
across ranks nor tells it the epoch, is paid here: the stream shards itself by (rank, world) and the loader's
``sampler`` attribute is an :class:`EpochSignal` that forwards Lightning's ``set_epoch`` through shared memory,
which persistent workers see when their next epoch's iterator starts. Batches are cut inside the workers (the
loader has ``batch_size=None``) so each rank's batch count is exact and equal across ranks: DDP never waits on a
rank that ran out.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler, get_worker_info

from ssl_lab.data.resumable import PositionedLoader

BLOCK_TARGET_BYTES = 16 << 20  # smallest read worth making: sequential reads this large run at disk speed

# Lightning warns that an IterableDataset's __len__ may be wrong with several workers; BlockStream splits its work
# per worker and its __len__ is exact, so the warning would only mislead.
warnings.filterwarnings("ignore", message=r".*`IterableDataset` has `__len__` defined.*")


class BlockSource(Protocol):
    """What the stream needs from a dataset: its sorted file indices, a block reader and a batch builder."""

    indices: np.ndarray

    def read_rows(self, rows: np.ndarray) -> np.ndarray: ...

    def make_batch(self, x: np.ndarray, rows: np.ndarray) -> dict[str, torch.Tensor]: ...


def block_length(chunk_rows: int | None, row_bytes: int, block_samples: int | None = None) -> int:
    """Samples per block: a whole number of chunks along the sample axis (1 for contiguous files), at least
    ``block_samples`` when given, else at least BLOCK_TARGET_BYTES; a read never splits a chunk."""
    chunk = max(1, int(chunk_rows or 1))
    want = int(block_samples) if block_samples else max(1, -(-BLOCK_TARGET_BYTES // max(1, row_bytes)))
    return chunk * max(1, -(-want // chunk))


def group_by_block(indices: np.ndarray, block: int) -> list[np.ndarray]:
    """Split sorted file indices into runs that fall into the same block (rows ``[b*block, (b+1)*block)``)."""
    idx = np.asarray(indices, np.int64)
    if len(idx) == 0:
        return []
    if np.any(np.diff(idx) <= 0):
        raise ValueError("group_by_block needs strictly increasing indices (a split is a sorted index list)")
    return np.split(idx, np.flatnonzero(np.diff(idx // block)) + 1)


def _cut(pieces: list[np.ndarray], start: int, stop: int) -> list[np.ndarray]:
    """The stretch [start, stop) of the stream formed by concatenating ``pieces``, as sub-pieces."""
    out, pos = [], 0
    for p in pieces:
        lo, hi = max(start, pos), min(stop, pos + len(p))
        if lo < hi:
            out.append(p[lo - pos : hi - pos])
        pos += len(p)
        if pos >= stop:
            break
    return out


def batches_per_rank(n: int, world: int, batch_size: int, drop_last: bool) -> int:
    per_rank = n // world
    return per_rank // batch_size if drop_last else -(-per_rank // batch_size)


def rank_plan(
    groups: list[np.ndarray], seed: int, epoch: int, rank: int, world: int, batch_size: int, drop_last: bool
) -> tuple[list[np.ndarray], int]:
    """(this rank's pieces in read order, its batch count). Every rank draws the same block permutation and takes
    its own equal stretch of it, so shares are disjoint and equal in size."""
    order = np.random.default_rng([int(seed), int(epoch), 0xB10C]).permutation(len(groups))
    shuffled = [groups[i] for i in order]
    n = sum(len(g) for g in groups)
    per_rank = n // world
    n_batches = batches_per_rank(n, world, batch_size, drop_last)
    used = n_batches * batch_size if drop_last else per_rank
    start = rank * per_rank
    return _cut(shuffled, start, start + used), n_batches


def worker_pieces(pieces: list[np.ndarray], n_batches: int, batch_size: int, worker: int, workers: int) -> list:
    """Worker ``worker``'s stretch of the rank's stream: a contiguous run of whole batches (the ragged last batch,
    if any, goes to the last worker), so no batch mixes workers and none is lost to per-worker drop_last."""
    b0, b1 = worker * n_batches // workers, (worker + 1) * n_batches // workers
    return _cut(pieces, b0 * batch_size, b1 * batch_size)


def worker_batches(n_batches: int, workers: int) -> list[int]:
    """Batches each worker yields per epoch (``worker_pieces`` gives worker w batches [w*n//W, (w+1)*n//W))."""
    return [(w + 1) * n_batches // workers - w * n_batches // workers for w in range(workers)]


def resume_roles(done: int, sizes: list[int]) -> tuple[list[int], int]:
    """(batches each worker had delivered, the worker whose batch comes next) once an in-order DataLoader has
    yielded ``done`` batches.

    Such a loader takes one batch from each worker that still has one, in worker order, round after round; a
    worker that runs out drops out of the rotation. A new loader starts its rotation at worker 0 again, so a
    resumed epoch gives worker i the part of worker (next + i) mod W, and the rotation goes on where it stopped."""
    taken = [0] * len(sizes)
    role = 0
    while done > 0 and any(t < s for t, s in zip(taken, sizes)):
        if taken[role] < sizes[role]:
            taken[role] += 1
            done -= 1
        role = (role + 1) % len(sizes)
    while any(t < s for t, s in zip(taken, sizes)) and taken[role] >= sizes[role]:
        role = (role + 1) % len(sizes)
    return taken, role


class BlockStream(IterableDataset):
    """Yields whole batches (dicts as the map-style dataset's collate would build them) in block order."""

    def __init__(
        self, source: BlockSource, block: int, window: int, batch_size: int, drop_last: bool, seed: int,
        rank: int = 0, world: int = 1,
    ) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, {world})")
        self.source, self.block, self.window = source, int(block), max(1, int(window))
        self.batch_size, self.drop_last, self.seed = int(batch_size), bool(drop_last), int(seed)
        self.rank, self.world = int(rank), int(world)
        self.groups = group_by_block(source.indices, self.block)
        # shared memory: persistent workers hold a copy of this object but read the epoch the main process set
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._skip: tuple[int, int] | None = None  # (epoch, batches of it the loader had already yielded)

    def skip(self, epoch: int, batches: int) -> None:
        """Start ``epoch`` after the loader's first ``batches`` batches (a run resumed mid-epoch). Set before the
        loader starts its workers, which copy this object; later epochs are whole."""
        self._skip = (int(epoch), int(batches)) if batches > 0 else None

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    def __len__(self) -> int:
        """Batches this rank yields per epoch (the same every epoch, and on every rank)."""
        return batches_per_rank(len(self.source.indices), self.world, self.batch_size, self.drop_last)

    def plan(self, epoch: int, worker: int = 0, workers: int = 1) -> list[np.ndarray]:
        """The pieces one worker reads in ``epoch``, in order (each inside one block: one contiguous read)."""
        pieces, n_batches = rank_plan(
            self.groups, self.seed, epoch, self.rank, self.world, self.batch_size, self.drop_last
        )
        return worker_pieces(pieces, n_batches, self.batch_size, worker, workers)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.epoch  # read now: the iterator's order is fixed when it is created
        role, skip = worker, 0
        if self._skip is not None and self._skip[0] == epoch:
            taken, first = resume_roles(self._skip[1], worker_batches(len(self), workers))
            role = (first + worker) % workers
            skip = taken[role]
        return self._batches(self.plan(epoch, role, workers), epoch, role, skip)

    def _read_any(self, rows: np.ndarray) -> np.ndarray:
        """Rows in any order from any blocks: one read per block touched, returned in ``rows`` order."""
        order = np.argsort(rows, kind="stable")
        parts = [self.source.read_rows(g) for g in group_by_block(rows[order], self.block)]
        out = np.empty((len(rows), *parts[0].shape[1:]), parts[0].dtype)
        out[order] = np.concatenate(parts)
        return out

    def _batches(
        self, pieces: list[np.ndarray], epoch: int, worker: int, skip: int = 0
    ) -> Iterator[dict[str, torch.Tensor]]:
        """This worker's batches; the first ``skip`` are left out, and windows they cover entirely are not read
        (their shuffles are still drawn, so what follows is exactly what an unbroken epoch yields)."""
        rng = np.random.default_rng([self.seed, epoch, self.rank, worker, 0x5A3F])
        carry_x: np.ndarray | None = None
        carry_rows = np.zeros(0, np.int64)
        bs = self.batch_size
        for w in range(0, len(pieces), self.window):
            win = pieces[w : w + self.window]
            rows = np.concatenate([carry_rows, *win])
            perm = rng.permutation(len(rows))
            full = len(perm) // bs * bs
            if skip and skip >= full // bs:  # every batch of this window was trained before the stop
                skip -= full // bs
                carry_x, carry_rows = None, rows[perm[full:]]
                continue
            if carry_x is None and len(carry_rows):
                carry_x = self._read_any(carry_rows)
            x = None
            at = len(carry_rows)
            for p in win:  # into one buffer as read: the window is held once, not twice
                part = self.source.read_rows(p)
                if x is None:
                    x = np.empty((len(rows), *part.shape[1:]), part.dtype)
                    if at:
                        x[:at] = carry_x
                x[at : at + len(part)] = part
                at += len(part)
            for s in range(skip * bs, full, bs):
                sel = perm[s : s + bs]
                yield self.source.make_batch(x[sel], rows[sel])
            skip = 0
            carry_x, carry_rows = x[perm[full:]], rows[perm[full:]]
        if len(carry_rows) and not self.drop_last and skip == 0:
            if carry_x is None:
                carry_x = self._read_any(carry_rows)
            yield self.source.make_batch(carry_x, carry_rows)


class EpochSignal(Sampler):
    """Stands where Lightning looks for ``set_epoch`` (``loader.sampler``); yields None forever, which is what a
    DataLoader over an IterableDataset draws from its sampler."""

    def __init__(self, stream: BlockStream) -> None:
        self.stream = stream

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)

    def __iter__(self) -> Iterator[None]:
        return itertools.repeat(None)


def stream_loader(stream: BlockStream, num_workers: int, pin_memory: bool = False, **kw: Any) -> DataLoader:
    """A DataLoader over a BlockStream whose ``sampler.set_epoch`` reaches the stream (and its workers)."""
    order = {"seed": stream.seed, "samples": len(stream.source.indices), "batch_size": stream.batch_size,
             "world": stream.world, "block": stream.block}
    loader = PositionedLoader(
        stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
        persistent_workers=num_workers > 0, order=order, **kw,
    )
    # DataLoader refuses a sampler for an IterableDataset and freezes the attribute after __init__; Lightning only
    # looks for set_epoch there, so the stand-in is installed past that guard.
    object.__setattr__(loader, "sampler", EpochSignal(stream))
    return loader


def window_bytes(block: int, row_bytes: int, window: int, workers: int) -> int:
    """Peak bytes the workers hold in read windows (decoded float32 rows can be larger than stored ones)."""
    return int(block * row_bytes * window * max(1, workers))

