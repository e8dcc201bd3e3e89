"""One process per run directory (ssl_lab.run_lock): a second process is refused with the holder's name, a dead
holder's lock is taken over, a refused run leaves nothing behind, and DDP ranks > 0 take no lock."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import ROOT, TINY, compose_cfg, tiny_data

from ssl_lab import run_lock
from ssl_lab.errors import ConfigError
from ssl_lab.tasks import TASKS
from ssl_lab.tasks.common import config_hash

HOLD = ("import sys, time; sys.path.insert(0, {root!r}); from ssl_lab.run_lock import acquire; "
        "acquire({run_dir!r}); print('held', flush=True); time.sleep(60)")


def holder_process(run_dir):
    """Another process that takes `run_dir` and keeps it until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD.format(root=str(ROOT), run_dir=str(run_dir))],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@contextlib.contextmanager
def held_elsewhere(run_dir):
    proc = holder_process(run_dir)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_second_process_is_refused_with_the_holders_name(tmp_path):
    run_dir = tmp_path / "run"
    with held_elsewhere(run_dir) as proc:
        with pytest.raises(ConfigError, match=rf"is in use by pid {proc.pid} on .* since .*another run_dir"):
            run_lock.acquire(run_dir)
        holder = json.loads((run_dir / run_lock.LOCK_NAME).read_text())
        assert holder["pid"] == proc.pid  # the refused attempt did not erase the holder's record


def test_lock_of_a_killed_process_is_taken_over_with_a_warning(tmp_path, caplog):
    run_dir = tmp_path / "run"
    proc = holder_process(run_dir)
    proc.kill()  # kill -9: no chance to release; the file stays, the kernel drops the flock
    proc.wait()
    assert (run_dir / run_lock.LOCK_NAME).exists()
    with caplog.at_level(logging.WARNING, logger="ssl_lab.run_lock"):
        lock = run_lock.acquire(run_dir)
    assert f"lock left by pid {proc.pid}" in caplog.text
    assert json.loads((run_dir / run_lock.LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (run_dir / run_lock.LOCK_NAME).exists()
    run_lock.acquire(run_dir).release()  # free again after a release


def test_refused_run_leaves_no_lock_and_no_folder(tmp_path):
    run_dir = tmp_path / "new" / "run"
    with pytest.raises(ConfigError, match="task=nope"):
        with run_lock.hold(run_dir):
            raise ConfigError("task=nope is not a known task")
    assert not (tmp_path / "new").exists()
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("a run's own file\n")
    with pytest.raises(RuntimeError):
        with run_lock.hold(run_dir):
            raise RuntimeError("crashed after writing")
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml"]


def test_ranks_other_than_zero_run_inside_rank_zeros_claim(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    with held_elsewhere(run_dir):
        monkeypatch.setattr(run_lock.rank_zero_only, "rank", 1)
        with run_lock.hold(run_dir) as lock:
            assert lock is None


def test_every_task_holds_its_run_dir(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    with held_elsewhere(run_dir):
        for task in TASKS:
            with pytest.raises(ConfigError, match="is in use by"):
                TASKS[task](compose_cfg([*TINY, *tiny_data("lens_sim", cache_dir), f"task={task}",
                                         f"run_dir={run_dir}"]))
        assert sorted(p.name for p in run_dir.iterdir()) == [run_lock.LOCK_NAME]  # nothing else was written


@pytest.mark.slow
def test_two_runs_started_together_into_one_run_dir(tmp_path, cache_dir):
    """One trains; the other exits 2 with one line (the lock's holder, or the finished run if it came that late),
    and the directory holds the winner's config next to the winner's weights."""
    run_dir = tmp_path / "run"
    args = [*TINY, *tiny_data("lens_sim", cache_dir), "trainer.max_epochs=20", f"run_dir={run_dir}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = {seed: subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args, f"seed={seed}"], cwd=tmp_path,
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in (1, 2)}
    done = {seed: (p.pid, p.wait(timeout=600), p.stderr.read()) for seed, p in procs.items()}
    codes = sorted(code for _, code, _ in done.values())
    assert codes == [0, 2], {seed: err[-1500:] for seed, (_, _, err) in done.items()}
    winner = next(seed for seed, (_, code, _) in done.items() if code == 0)
    loser_err = done[3 - winner][2].strip()
    assert loser_err.count("\n") == 0 and loser_err.startswith("ssl_lab: error: "), loser_err
    assert (f"is in use by pid {done[winner][0]}" in loser_err) or ("already holds a run" in loser_err)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["seed"] == winner
    meta = torch.load(run_dir / "backbone.pt", weights_only=True)["meta"]
    assert meta["config_hash"] == config_hash(compose_cfg([*args, f"seed={winner}"]))  # weights of the same run
    assert not (run_dir / run_lock.LOCK_NAME).exists()  # released on exit
    winner_log = (run_dir / "run.log").read_text()
    assert "is in use by pid" not in winner_log and "already holds a run" not in winner_log  # the refused
    assert "ERROR" not in winner_log  # process wrote nothing into the winner's log
