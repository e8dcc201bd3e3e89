"""Each bad input stops before training with one message that names the culprit and the fix."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from conftest import TINY, compose_cfg, run_cli, tiny_data
from ssl_lab.cli import run_or_exit


def _h5(path, key="images", shape=(20, 1, 16, 16), nan=False):
    data = np.random.default_rng(0).random(shape, dtype=np.float32)
    if nan:
        data[3, 0, 2, 2] = np.nan
    with h5py.File(path, "w") as f:
        f[key] = data
    return path


def _fails(overrides, run_dir, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_or_exit(compose_cfg([*TINY, *overrides, f"run_dir={run_dir}"]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("ssl_lab: error:") == 1 and "Traceback" not in err
    assert not run_dir.exists()  # nothing written: the checks come before the run directory is claimed
    return err


def test_missing_file(tmp_path, capsys):
    err = _fails(["dataset=lens_h5", "dataset.path=/no/such/lenses.h5"], tmp_path / "run", capsys)
    assert "/no/such/lenses.h5" in err and "dataset.path" in err


def test_wrong_key_lists_available_keys(tmp_path, capsys):
    path = _h5(tmp_path / "x.h5", key="imgs")
    err = _fails(["dataset=lens_h5", f"dataset.path={path}"], tmp_path / "run", capsys)
    assert "'images'" in err and "imgs" in err and "dataset.image_key" in err


def test_wrong_channel_count(tmp_path, capsys):
    path = _h5(tmp_path / "x.h5", shape=(20, 3, 16, 16))
    err = _fails(["dataset=lens_h5", f"dataset.path={path}"], tmp_path / "run", capsys)
    assert "3 channels" in err and "dataset.in_chans" in err


def test_nan_pixels_under_policy_error(tmp_path, capsys):
    path = _h5(tmp_path / "x.h5", nan=True)
    err = _fails(["dataset=lens_h5", f"dataset.path={path}", "dataset.nan_policy=error"], tmp_path / "run", capsys)
    assert "nan_policy" in err and str(path) in err


def test_missing_mandatory_path(tmp_path, capsys):
    err = _fails(["dataset=lens_h5"], tmp_path / "run", capsys)
    assert "dataset.path must be set" in err


def test_rgb_augmentation_on_one_channel_data(tmp_path, cache_dir, capsys):
    err = _fails([*tiny_data("lens_sim", cache_dir), "augment=simclr_rgb"], tmp_path / "run", capsys)
    assert "augment=simclr_rgb" in err and "color_jitter" in err and "augment=physics" in err


def test_batch_larger_than_training_set(tmp_path, cache_dir, capsys):
    err = _fails([*tiny_data("lens_sim", cache_dir), "dataset.batch_size=500"], tmp_path / "run", capsys)
    assert "dataset.batch_size=500" in err


def test_view_larger_than_image(tmp_path, cache_dir, capsys):
    err = _fails([*tiny_data("lens_sim", cache_dir), "augment.size=64"], tmp_path / "run", capsys)
    assert "augment.size=64" in err and "32x32" in err


def test_backbone_channels_disagree_with_data(tmp_path, cache_dir, capsys):
    err = _fails([*tiny_data("lens_sim", cache_dir), "backbone.in_chans=3"], tmp_path / "run", capsys)
    assert "backbone.in_chans=3" in err and "1 channel" in err


@pytest.mark.parametrize("override,expected", [
    ("method=nosuch", "Could not find 'method/nosuch'"),
    ("optim.lr_typo=0.1", "lr_typo"),
])
def test_unknown_choice_or_option_through_the_cli(tmp_path, override, expected):
    out = run_cli([override], cwd=tmp_path)
    assert out.returncode != 0
    assert expected in out.stderr and "Traceback" not in out.stderr


def test_data_error_through_the_cli_has_no_traceback(tmp_path):
    out = run_cli(["dataset=lens_h5", "dataset.path=/no/such.h5", f"run_dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert out.returncode == 2
    assert "/no/such.h5" in out.stderr and "Traceback" not in out.stderr


def test_two_view_method_with_three_views(tmp_path, cache_dir, capsys):
    err = _fails([*tiny_data("lens_sim", cache_dir), "augment.n_views=3"], tmp_path / "run", capsys)
    assert "augment.n_views=3" in err and "augment.n_views=2" in err
