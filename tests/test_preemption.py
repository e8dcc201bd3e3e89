"""A preemption signal saves a checkpoint mid-epoch and stops; the run continues to the same weights as an
uninterrupted one, with resume=auto, or started again with its original arguments (a requeued job)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch

from conftest import ROOT, TINY, compose_cfg, tiny_data
from ssl_lab.artifacts import load_backbone_file
from ssl_lab.errors import ConfigError, RunInterrupted
from ssl_lab.preemption import PreemptionCheckpoint
from ssl_lab.tasks import TASKS, pretrain

pytestmark = pytest.mark.slow

SIGNAL = "+callbacks.sig._target_=tests.signal_at.SignalAt"


def _lens(cache_dir, run_dir, *extra):
    # 18 training images in batches of 4: 4 steps an epoch, 8 in all; warmup + cosine must survive the stop too.
    return [*TINY, *tiny_data("lens_sim", cache_dir), "trainer.max_epochs=2", "trainer.limit_train_batches=null",
            "dataset.batch_size=4", "optim.warmup_epochs=0.5", f"run_dir={run_dir}", *extra]


def _blocks_h5(path):
    """72 images in chunks of 4 rows: block reading with small windows crosses many window boundaries."""
    x = np.random.default_rng(3).random((72, 1, 16, 16), dtype=np.float32)
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=x, chunks=(4, 1, 16, 16))
    return path


def _h5(path, run_dir, *extra):
    return [*TINY, "dataset=lens_h5", f"dataset.path={path}", "dataset.read=block", "dataset.block_samples=4",
            "dataset.window_blocks=2", "dataset.num_workers=2", "dataset.batch_size=5", "dataset.val_fraction=0.1",
            "trainer.max_epochs=2", "trainer.limit_train_batches=null", f"run_dir={run_dir}", *extra]


def _same_backbone(a_dir, b_dir):
    a = load_backbone_file(a_dir)["state_dict"]
    b = load_backbone_file(b_dir)["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("data", ["map", "block"])
def test_signal_mid_epoch_then_restart_matches_uninterrupted_run(tmp_path, cache_dir, data):
    before = signal.getsignal(signal.SIGTERM)
    if data == "map":
        overrides, step = (lambda d, *e: _lens(cache_dir, d, *e)), 2
    else:  # 2 workers, each reading windows of 2 blocks of 4 rows: the stop falls inside a worker's window
        path = _blocks_h5(tmp_path / "x.h5")
        overrides, step = (lambda d, *e: _h5(path, d, *e)), 4
    whole = pretrain(compose_cfg(overrides(tmp_path / "whole")))
    per_epoch = whole["global_step"] // 2
    assert per_epoch > step + 1  # the stop falls inside epoch 0

    # SIGTERM after step `step` (mid-epoch 0); the same arguments again, as a requeued job would repeat them.
    again = overrides(tmp_path / "split", SIGNAL, f"+callbacks.sig.step={step}",
                      f"+callbacks.sig.once={tmp_path / 'sent'}")
    with pytest.raises(RunInterrupted, match=rf"stopped by SIGTERM at step {step + 1} \(epoch 0\).*resume=auto") as err:
        pretrain(compose_cfg(again))
    assert err.value.exit_code == 128 + signal.SIGTERM
    split = tmp_path / "split"
    marker = json.loads((split / "checkpoints" / "interrupted.json").read_text())
    assert marker["signal"] == "SIGTERM" and marker["global_step"] == step + 1
    assert not (split / "backbone.pt").exists() and not (split / "summary.json").exists()  # not finished
    assert signal.getsignal(signal.SIGTERM) == before  # the handlers of whoever runs the training are back

    resumed = pretrain(compose_cfg(again))
    assert resumed["resumed_from"].endswith("last.ckpt") and resumed["global_step"] == 2 * per_epoch
    assert not (split / "checkpoints" / "interrupted.json").exists()  # finished: no longer a continuation
    assert sorted(p.name for p in (split / "checkpoints").iterdir()) == ["last.ckpt"]
    _same_backbone(tmp_path / "whole", split)  # every sample trained once, in the same order


def test_restart_with_another_config_is_refused_and_resume_auto_continues_as_saved(tmp_path, cache_dir):
    run = tmp_path / "run"
    first = _lens(cache_dir, run, SIGNAL, "+callbacks.sig.step=1", "trainer.max_epochs=1")
    with pytest.raises(RunInterrupted):
        pretrain(compose_cfg(first))
    other = _lens(cache_dir, run, "trainer.max_epochs=1", "optim.lr=0.5")
    with pytest.raises(ConfigError, match="stopped by a signal and saved another config; continue it as saved"):
        TASKS["pretrain"](compose_cfg(other))
    with pytest.raises(ConfigError, match=r"was run with another config \(.*optim\.lr: 0\.001 -> 0\.5"):
        TASKS["pretrain"](compose_cfg([*other, "resume=auto"]))
    summary = TASKS["pretrain"](compose_cfg([*first, "resume=auto"]))
    assert summary["global_step"] == 4 and summary["resumed_from"].endswith("last.ckpt")


def test_cli_stops_cleanly_when_the_whole_process_group_gets_sigterm(tmp_path, cache_dir):
    """SLURM signals every process of the job: DataLoader workers must not die before the checkpoint is saved."""
    run = tmp_path / "run"
    args = [*_lens(cache_dir, run, SIGNAL, "+callbacks.sig.step=1", "+callbacks.sig.group=true",
                   "dataset.num_workers=1")]
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600, start_new_session=True)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "ssl_lab: stopped by SIGTERM at step 2" in proc.stderr
    assert "DataLoader worker" not in proc.stderr
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2 and ckpt["ssl_lab"]["method"] == "simclr"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml", "logs", "run.log", "splits.json"]
    assert "stopped by SIGTERM" in (run / "run.log").read_text()


def test_submitit_job_is_requeued_and_finishes(tmp_path, cache_dir):
    """submitit's own preemption signal (SIGUSR2): the checkpoint is saved first, then submitit requeues the job,
    which continues from it with its original arguments."""
    args = ["-m", "hydra/launcher=submitit_local", f"hydra.sweep.dir={tmp_path / 'sweep'}",
            *[a for a in _lens(cache_dir, "x") if not a.startswith("run_dir=")],
            SIGNAL, "+callbacks.sig.step=2", "+callbacks.sig.signal=SIGUSR2", f"+callbacks.sig.once={tmp_path / 's'}"]
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (job,) = [p for p in (tmp_path / "sweep").iterdir() if p.name.startswith("0_")]
    log = (job / "run.log").read_text()
    assert "received SIGUSR2" in log and "this job is preempted" in log
    assert "was stopped by SIGUSR2 at step 3; continuing it" in log
    assert json.loads((job / "summary.json").read_text())["global_step"] == 8
    assert sorted(p.name for p in (job / "logs").iterdir()) == ["version_0", "version_1"]


def test_ranks_vote_on_a_signal_only_on_logging_steps_and_epoch_ends(tmp_path):
    """Under DDP the stop is a collective vote whose result the host must read (a GPU sync): not every step."""
    votes = []

    class Strategy:
        def reduce_boolean_decision(self, decision, all=True):
            votes.append(decision)
            return False  # nobody got a signal: train on

    callback = PreemptionCheckpoint(tmp_path)
    for logging_step, last_batch, got_signal in [(False, False, True), (True, False, True), (False, True, False)]:
        callback.received = int(signal.SIGTERM) if got_signal else None
        trainer = SimpleNamespace(world_size=2, strategy=Strategy(), is_last_batch=last_batch,
                                  _logger_connector=SimpleNamespace(should_update_logs=logging_step))
        callback.on_train_batch_end(trainer, None, None, None, 0)
    assert votes == [True, False]  # no vote on the first step, a signal noted and voted on at the logging step
