"""resume=auto continues a run with the config it saved, and refuses a request that would change it."""
from __future__ import annotations

import json
import signal

import pytest
import yaml
from conftest import TINY, compose_cfg, run_cli, tiny_data

from ssl_lab.errors import ConfigError
from ssl_lab.resume import config_diff, continued_config
from ssl_lab.tasks import TASKS
from ssl_lab.tasks.common import config_hash, resolve_precision


def test_diff_compares_only_what_the_command_line_names():
    saved = {"seed": 3, "method": {"name": "byol", "base_tau": 0.99}, "optim": {"lr": 0.001},
             "accelerator": {"precision": resolve_precision("auto")}, "run_dir": "a", "scale": {"lr": 0.001}}
    requested = {"seed": 0, "method": {"name": "simclr", "temperature": 0.1}, "optim": {"lr": 0.01},
                 "accelerator": {"precision": "auto"}, "run_dir": "b"}
    assert config_diff(saved, requested, ["run_dir=b", "resume=auto"]) == []  # defaults the user did not restate
    assert config_diff(saved, requested, ["optim.lr=0.01"]) == [("optim.lr", 0.001, 0.01)]
    assert config_diff(saved, requested, ["+method=simclr"]) == [
        ("method.base_tau", 0.99, "<unset>"), ("method.name", "byol", "simclr"), ("method.temperature", "<unset>", 0.1)]
    # without a command line (a Python call) everything is compared; `auto` equals what it resolved to
    assert [k for k, _, _ in config_diff(saved, requested, None)] == [
        "method.base_tau", "method.name", "method.temperature", "optim.lr", "seed"]


def test_config_hash_is_the_same_for_auto_precision_and_its_resolution(cache_dir):
    auto = compose_cfg([*TINY, *tiny_data("lens_sim", cache_dir)])
    precision = f"accelerator.precision={resolve_precision('auto')}"
    resolved = compose_cfg([*TINY, *tiny_data("lens_sim", cache_dir), precision])
    assert config_hash(auto) == config_hash(resolved)


def test_changed_config_is_refused_with_a_diff_and_nothing_changes(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    base = [*TINY, *tiny_data("lens_sim", cache_dir), f"run_dir={run_dir}"]
    TASKS["pretrain"](compose_cfg(base))
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match=r"was run with another config \(optim\.lr: 0\.001 -> 0\.01; "
                                          r"trainer\.max_epochs: 1 -> 3\)\. resume=auto continues a run exactly"):
        TASKS["pretrain"](compose_cfg([*base, "resume=auto", "optim.lr=0.01", "trainer.max_epochs=3"]))
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    same = continued_config(compose_cfg([*base, "resume=auto"]), run_dir)  # the same request is accepted as saved
    assert same.resume == "auto" and same.optim.lr == 0.001 and "scale" not in same


@pytest.mark.slow
def test_resume_auto_alone_continues_the_saved_run(tmp_path, cache_dir):
    """Stopped by SIGTERM mid-run, the run continues from `run.py run_dir=R resume=auto`: method, seed, data and
    schedule come from its config.yaml (repeating an override with its saved value is fine); a changed one is not."""
    run_dir = tmp_path / "run"
    first = [*TINY, *tiny_data("lens_sim", cache_dir), "method=byol", "method.pred_hidden_dims=[32]", "seed=3",
             "trainer.max_epochs=2", "trainer.limit_train_batches=null", "dataset.batch_size=4",
             "+callbacks.sig._target_=tests.signal_at.SignalAt", "+callbacks.sig.step=2",
             f"+callbacks.sig.once={tmp_path / 'sent'}", f"run_dir={run_dir}"]
    stopped = run_cli(first, tmp_path)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
    refused = run_cli([f"run_dir={run_dir}", "resume=auto", "method=simclr"], tmp_path)
    assert refused.returncode == 2 and "method.name: 'byol' -> 'simclr'" in refused.stderr
    assert refused.stderr.strip().count("\n") == 0
    resumed = run_cli([f"run_dir={run_dir}", "resume=auto", "seed=3"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["method"] == "byol" and summary["resumed_from"].endswith("last.ckpt")
    assert summary["global_step"] == 8  # 18 images in batches of 4 (last dropped): 4 steps x 2 epochs
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["seed"] == 3
