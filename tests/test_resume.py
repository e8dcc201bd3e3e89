"""resume=auto continues an interrupted run and ends with the same weights as an uninterrupted one."""
from __future__ import annotations

import shutil

import lightning.pytorch as pl
import pytest
import torch

from conftest import TINY, compose_cfg, tiny_data
from ssl_lab.artifacts import load_backbone_file
from ssl_lab.errors import ConfigError
from ssl_lab.tasks import pretrain

pytestmark = pytest.mark.slow


class StopAfterEpoch(pl.Callback):
    """Stands in for a killed job: stops cleanly after the first epoch, its last.ckpt written."""

    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


def _overrides(cache_dir, run_dir, *extra):
    # warmup + cosine over 2 epochs: the scheduler state must survive the resume too.
    return [*TINY, *tiny_data("lens_sim", cache_dir), "trainer.max_epochs=2",
            "optim.warmup_epochs=0.5", f"run_dir={run_dir}", *extra]


# SimCLR; BYOL, whose EMA target and tau schedule must resume too.
METHODS = {"simclr": [], "byol": ["method=byol", "method.pred_hidden_dims=[32]"]}


@pytest.mark.parametrize("method", list(METHODS))
def test_resumed_run_matches_uninterrupted_run(tmp_path, cache_dir, method):
    extra = METHODS[method]
    whole = pretrain(compose_cfg(_overrides(cache_dir, tmp_path / "whole", *extra)))
    assert whole["global_step"] == 4  # 18 training images, batches of 8, last one dropped

    first = pretrain(compose_cfg(_overrides(cache_dir, tmp_path / "split", *extra,
                                            f"+callbacks.stop._target_={__name__}.StopAfterEpoch")))
    assert first["global_step"] == 2
    second = pretrain(compose_cfg(_overrides(cache_dir, tmp_path / "split", *extra, "resume=auto")))
    assert second["resumed_from"].endswith("last.ckpt") and second["global_step"] == 4

    logs = sorted(p.parent.name for p in (tmp_path / "split" / "logs").glob("*/metrics.csv"))
    assert logs == ["version_0", "version_1"]  # the resumed part logs beside the first, losing nothing
    a = load_backbone_file(tmp_path / "whole")["state_dict"]
    b = load_backbone_file(tmp_path / "split")["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_resume_auto_without_checkpoint_starts_fresh(tmp_path, cache_dir):
    summary = pretrain(compose_cfg(_overrides(cache_dir, tmp_path / "new", "resume=auto", "trainer.max_epochs=1")))
    assert summary["resumed_from"] is None and summary["global_step"] == 2


def test_resume_auto_into_a_finished_run_without_checkpoint_is_refused(tmp_path, cache_dir):
    """Checkpoints deleted to save disk: resume=auto must not start over and overwrite the finished run."""
    run_dir = tmp_path / "done"
    pretrain(compose_cfg(_overrides(cache_dir, run_dir, "trainer.max_epochs=1")))
    shutil.rmtree(run_dir / "checkpoints")
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match=r"holds a finished run \(summary.json, backbone.pt\) but no "
                                          r"checkpoints/last.ckpt.*nothing was written"):
        pretrain(compose_cfg(_overrides(cache_dir, run_dir, "resume=auto", "trainer.max_epochs=1")))
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in run_dir.rglob("*") if p.is_file()}
    assert after == before
