"""A loader built for a run resumed mid-epoch yields exactly the batches the unbroken epoch had left."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from ssl_lab.checkpoint_io import resume_position
from ssl_lab.data.base import EpochSeededSampler
from ssl_lab.data.block_sampler import BlockStream, resume_roles, stream_loader


class RowSource:
    """A BlockSource whose images are their own row numbers: batches show exactly which samples they hold."""

    def __init__(self, n: int) -> None:
        self.indices = np.arange(n)

    def read_rows(self, rows):
        return np.asarray(rows, np.float32)[:, None]

    def make_batch(self, x, rows):
        assert np.array_equal(x[:, 0], rows)  # the data read for a batch are its rows' own data
        return {"rows": torch.from_numpy(np.asarray(rows))}


def _stream_batches(n, workers, skip, drop_last, epoch=1):
    stream = BlockStream(RowSource(n), block=4, window=2, batch_size=5, drop_last=drop_last, seed=0)
    stream.set_epoch(epoch)
    stream.skip(epoch, skip)
    return [b["rows"].tolist() for b in stream_loader(stream, workers)]


@pytest.mark.parametrize("workers,n,drop_last", [(0, 65, True), (2, 65, True), (2, 23, False), (3, 67, False)])
def test_block_stream_resumes_after_any_batch(workers, n, drop_last):
    whole = _stream_batches(n, workers, 0, drop_last)
    rows = [r for b in whole for r in b]
    assert len(rows) == len(set(rows)) == (n // 5 * 5 if drop_last else n)
    for done in range(1, len(whole)):
        assert _stream_batches(n, workers, done, drop_last) == whole[done:], done


def test_block_stream_skip_applies_to_its_epoch_only():
    assert _stream_batches(40, 0, 3, True, epoch=2)[0] != _stream_batches(40, 0, 0, True, epoch=2)[0]
    stream = BlockStream(RowSource(40), block=4, window=2, batch_size=5, drop_last=True, seed=0)
    stream.set_epoch(3)
    stream.skip(2, 3)  # meant for epoch 2: epoch 3 is whole
    assert len(list(stream_loader(stream, 0))) == 8


def test_resume_roles_follow_the_loader_rotation():
    assert resume_roles(0, [3, 3]) == ([0, 0], 0)
    assert resume_roles(3, [3, 3]) == ([2, 1], 1)
    assert resume_roles(5, [2, 3, 3]) == ([2, 2, 1], 2)
    assert resume_roles(7, [2, 3, 3]) == ([2, 3, 2], 2)  # worker 0 ran out: the rotation skips it


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sampler_shards_like_torch_and_skips_within_a_rank(world):
    n, seed = 23, 5
    order = list(EpochSeededSampler(n, seed))
    for rank in range(world):
        ours = EpochSeededSampler(n, seed, rank=rank, world=world)
        reference = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=False)
        assert list(ours) == [order[i] for i in reference] and len(ours) == len(reference)
        ours.skip(0, 4)
        assert list(ours) == [order[i] for i in reference][4:]
        assert list(ours) == [order[i] for i in reference]  # the next pass is whole
        assert len(ours) == len(reference)  # the loader's length stays the epoch's, as Lightning counts it


def test_loader_of_a_resumed_epoch_holds_the_rest_of_it():
    sampler = EpochSeededSampler(30, 1)
    sampler.set_epoch(2)
    whole = [b.tolist() for b in DataLoader(range(30), batch_size=4, sampler=sampler, drop_last=True)]
    sampler.skip(2, 3 * 4)
    assert [b.tolist() for b in DataLoader(range(30), batch_size=4, sampler=sampler, drop_last=True)] == whole[3:]


def _ckpt(epoch_ready, epoch_processed, batches):
    return {"epoch": epoch_processed, "loops": {"fit_loop": {
        "epoch_progress": {"current": {"ready": epoch_ready, "started": epoch_ready, "processed": epoch_processed,
                                       "completed": epoch_processed}},
        "epoch_loop.batch_progress": {"current": {"processed": batches}}}}}


def test_resume_position_from_lightning_loop_state():
    assert resume_position(_ckpt(3, 2, 5)) == (2, 5)  # saved in epoch 2 after 5 batches
    assert resume_position(_ckpt(3, 3, 9)) == (3, 0)  # saved when epoch 2 ended: epoch 3 from its start
