"""Loggers write where the run lives, and a W&B key never reaches a file."""
from __future__ import annotations

import pytest

from conftest import TINY, run_cli, tiny_data

pytestmark = pytest.mark.slow


def test_wandb_offline_never_writes_the_key(tmp_path, cache_dir):
    secret = "0123456789abcdef-not-a-real-key"
    run_dir = tmp_path / "run"
    out = run_cli([*TINY, *tiny_data("lens_sim", cache_dir), "logger=wandb", f"run_dir={run_dir}"], cwd=tmp_path,
                  env={"WANDB_API_KEY": secret, "WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert out.returncode == 0, out.stderr[-3000:]
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any("wandb" in p.parts for p in files)  # the offline run is inside the run directory
    assert (run_dir / "logs" / "version_0" / "metrics.csv").is_file()
    for path in files:
        assert secret.encode() not in path.read_bytes(), path
    assert secret not in out.stdout + out.stderr


def test_tensorboard_writes_event_files(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    out = run_cli([*TINY, *tiny_data("lens_sim", cache_dir), "logger=tensorboard", f"run_dir={run_dir}"],
                  cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))


def test_wandb_offline_gets_downstream_plots_and_metrics_table(tmp_path, cache_dir):
    pre = tmp_path / "pre"
    data = tiny_data("lens_sim", cache_dir)
    assert run_cli([*TINY, *data, f"run_dir={pre}"], cwd=tmp_path).returncode == 0
    run_dir = tmp_path / "linear"
    out = run_cli([*TINY, *data, "task=linear", "task.max_epochs=1", f"pretrained={pre}", "logger=wandb",
                   f"run_dir={run_dir}"], cwd=tmp_path, env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert out.returncode == 0, out.stderr[-3000:]
    media = list(run_dir.glob("wandb/offline-run-*/files/media/images/plots_*.png"))
    assert len(media) >= 3  # curves, confusion matrix, ROC
    tables = list(run_dir.glob("wandb/offline-run-*/files/media/table/metrics_*.table.json"))
    assert tables and "accuracy" in tables[0].read_text()


@pytest.mark.parametrize("task", ["pretrain", "supervised"])
def test_refused_wandb_login_is_one_line_without_the_key_and_nothing_written(tmp_path, cache_dir, monkeypatch,
                                                                               capsys, task):
    """A wrong WANDB_API_KEY: wandb's own error (here as it reads with no network), as one line naming the fix."""
    from lightning.pytorch.loggers import WandbLogger

    from conftest import compose_cfg
    from ssl_lab.cli import run_or_exit

    secret = "0123456789012345678901234567890123456789"

    def refuse(self):
        raise RuntimeError(f"Failed to authenticate with key {secret}: the service did not respond in time.")

    monkeypatch.setenv("WANDB_API_KEY", secret)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr(WandbLogger, "experiment", property(refuse))
    run_dir = tmp_path / "run"
    extra = ["task=supervised", "task.max_epochs=1"] if task == "supervised" else []
    with pytest.raises(SystemExit) as exit_info:
        run_or_exit(compose_cfg([*TINY, *tiny_data("lens_sim", cache_dir), *extra, "logger=wandb",
                                 f"run_dir={run_dir}"]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("ssl_lab:")]  # Lightning's INFO lines aside
    assert line.startswith("ssl_lab: error: logger=wandb: W&B did not start the online run")
    assert "WANDB_MODE=offline" in line and "<WANDB_API_KEY>" in line and secret not in err
    assert not run_dir.exists()  # nothing written: no config.yaml, no lock left behind
