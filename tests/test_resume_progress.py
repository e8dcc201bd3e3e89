"""A run resumed mid-epoch shows that epoch where it stopped (its total and an honest ETA), with no Lightning warning
that the loader is not resumable: ssl_lab's loaders resume exactly and say so (ssl_lab.data.resumable)."""
from __future__ import annotations

import logging
import signal

import pytest
from conftest import TINY, run_cli, tiny_data

from ssl_lab.data.base import EpochSeededSampler
from ssl_lab.data.resumable import PositionedLoader


@pytest.mark.slow
def test_resumed_epoch_keeps_its_bar_and_raises_no_loader_warning(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    args = [*[a for a in TINY if "progress_bar" not in a], *tiny_data("lens_sim", cache_dir),
            "trainer.limit_train_batches=null", "dataset.batch_size=4", f"run_dir={run_dir}"]
    stopped = run_cli([*args, "+callbacks.sig._target_=tests.signal_at.SignalAt", "+callbacks.sig.step=2",
                       f"+callbacks.sig.once={tmp_path / 'sent'}"], tmp_path)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
    resumed = run_cli([f"run_dir={run_dir}", "resume=auto"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "not resumable" not in resumed.stderr + resumed.stdout
    frames = [f.strip() for f in resumed.stdout.replace("\r", "\n").splitlines() if "it/s" in f or "s/it" in f]
    epoch0 = next(i for i, f in enumerate(frames) if f.startswith("Epoch 0"))
    assert frames[epoch0].startswith("Epoch 0:  50%") and "2/4" in frames[epoch0]  # 2 batches done before the stop
    assert not any("/?" in f for f in frames[epoch0:])  # the total is known from there on
    assert not any("<-" in f or ", -" in f for f in frames)  # no negative ETA or rate


def test_loader_checks_the_order_its_checkpoint_was_cut_for(caplog):
    order = {"seed": 0, "samples": 10, "batch_size": 2, "world": 1}
    loader = PositionedLoader(range(10), batch_size=2, sampler=EpochSeededSampler(10), order=order)
    state = loader.state_dict()
    with caplog.at_level(logging.WARNING, logger="ssl_lab.data.resumable"):
        loader.load_state_dict(state)
        assert not caplog.records
        other = PositionedLoader(range(10), batch_size=5, sampler=EpochSeededSampler(10),
                                 order={**order, "batch_size": 5})
        other.load_state_dict(state)
    assert "batch_size 2 -> 5" in caplog.text and "not exactly the samples it had not trained on" in caplog.text
