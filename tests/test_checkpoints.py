"""Checkpoints and backbones survive a killed writer, and a file that does not fit the run is refused by name."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, TINY, compose_cfg, tiny_data
from ssl_lab.artifacts import load_backbone_file, save_backbone
from ssl_lab.checkpoint_io import AtomicCheckpointIO, read_checkpoint
from ssl_lab.cli import run_or_exit
from ssl_lab.tasks.pretrain import build_pretraining

WRITER = """
import sys, torch
from ssl_lab.artifacts import save_backbone
from ssl_lab.checkpoint_io import AtomicCheckpointIO
kind, path = sys.argv[1], sys.argv[2]
layer = torch.nn.Linear(1024, 2048)  # 8 MB: a write takes long enough to be cut in the middle
for i in range(1, 10**6):
    layer.weight.data.fill_(i)
    if kind == "ckpt":
        AtomicCheckpointIO().save_checkpoint({"state_dict": layer.state_dict(), "i": i}, path)
    else:
        save_backbone(path, layer, {"i": i})
    print(i, flush=True)
"""


def _load(kind, path):
    if kind == "ckpt":
        ckpt = torch.load(path, weights_only=True)
        i, weight = ckpt["i"], ckpt["state_dict"]["weight"]
    else:
        payload = load_backbone_file(path)
        i, weight = payload["meta"]["i"], payload["state_dict"]["weight"]
    assert torch.all(weight == i)  # the whole of one version, never a mix
    return i


@pytest.mark.parametrize("kind", ["ckpt", "backbone"])
def test_a_writer_killed_at_any_moment_leaves_the_old_or_the_new_file(tmp_path, kind):
    path = tmp_path / ("last.ckpt" if kind == "ckpt" else "backbone.pt")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for delay in (0.05, 0.13, 0.21, 0.34, 0.55, 0.89):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, kind, str(path)], stdout=subprocess.PIPE, text=True,
                                env=env)
        assert proc.stdout.readline().strip() == "1"  # one whole write done; now kill one in flight
        time.sleep(delay)
        proc.kill()
        proc.wait()
        assert _load(kind, path) >= 1  # loads, and holds one whole version: never torn
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) <= 1  # at most the one the last killed writer was writing
    if kind == "ckpt":
        AtomicCheckpointIO().save_checkpoint({"state_dict": {}, "i": 0}, path)
    else:
        save_backbone(path, torch.nn.Linear(1, 1), {"i": 0})
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []  # the next write cleans up


def _fails(overrides, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_or_exit(compose_cfg(overrides))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("ssl_lab: error:") == 1 and "Traceback" not in err
    return err


def _lightning_ckpt(model, header=True):
    ckpt = {"state_dict": model.state_dict(), "pytorch-lightning_version": "2.6.0", "loops": {}}
    if header:
        ckpt["ssl_lab"] = model.checkpoint_header()
    return ckpt


@pytest.fixture(scope="module")
def lens_model(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return build_pretraining(compose_cfg([*TINY, *tiny_data("lens_sim", cache)]))[1]


def _bad_files(tmp_path, model):
    good = tmp_path / "good.ckpt"
    torch.save(_lightning_ckpt(model), good)
    data = good.read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "noise.ckpt").write_bytes(b"\x00garbage" * 1000)
    torch.save(_lightning_ckpt(model, header=False), tmp_path / "foreign.ckpt")
    save_backbone(tmp_path / "backbone.pt", model.backbone, {"method": "simclr"})
    torch.save({**_lightning_ckpt(model), "extra": Pickled()}, tmp_path / "pickled.ckpt")
    return good


class Pickled:
    """An arbitrary object in a checkpoint: what a weights-only load must refuse."""


@pytest.mark.parametrize("name,expected", [
    ("truncated.ckpt", "cannot be read as a checkpoint (corrupt or truncated?)"),
    ("noise.ckpt", "cannot be read as a checkpoint (corrupt or truncated?)"),
    ("foreign.ckpt", "not one written by ssl_lab"),
    ("pickled.ckpt", "holds Python objects beyond tensors and plain values, which ssl_lab refuses to unpickle"),
    ("backbone.pt", "not a Lightning training checkpoint (a backbone.pt goes to pretrained="),
    ("missing.ckpt", "no such checkpoint file"),
])
def test_unusable_checkpoint_is_refused_before_anything_is_written(tmp_path, cache_dir, lens_model, capsys, name,
                                                                   expected):
    _bad_files(tmp_path, lens_model)
    run = tmp_path / "run"
    err = _fails([*TINY, *tiny_data("lens_sim", cache_dir), f"resume={tmp_path / name}", f"run_dir={run}"], capsys)
    assert str(tmp_path / name) in err and expected in err
    assert "weights_only=False" not in err and err.strip().count("\n") == 0  # one line, no unsafe advice
    assert not run.exists()


@pytest.mark.parametrize("change,expected", [
    (["method=barlow"], "written by method=simclr, backbone resnet15 with 1 input channel(s); this run builds "
                        "method=barlow"),
    (["backbone=resnet18"], "this run builds method=simclr, backbone resnet18 with 1 input channel(s)"),
    (["dataset=jets_sim"], "this run builds method=simclr, backbone resnet15 with 8 input channel(s)"),
])
def test_checkpoint_of_another_method_backbone_or_channel_count_is_refused(tmp_path, cache_dir, lens_model, capsys,
                                                                           change, expected):
    good = _bad_files(tmp_path, lens_model)
    run = tmp_path / "run"
    data = tiny_data("jets_sim" if change == ["dataset=jets_sim"] else "lens_sim", cache_dir)
    err = _fails([*TINY, *data, *change, f"resume={good}", f"run_dir={run}"], capsys)
    assert str(good) in err and expected in err and "Resume with the same method" in err
    assert not run.exists()


def test_checkpoint_io_reads_what_it_wrote_and_names_what_it_cannot(tmp_path, lens_model):
    io = AtomicCheckpointIO()
    io.save_checkpoint(_lightning_ckpt(lens_model), tmp_path / "a.ckpt")
    back = io.load_checkpoint(tmp_path / "a.ckpt")
    assert back["ssl_lab"]["backbone"]["in_chans"] == 1 and back["ssl_lab"]["method"] == "simclr"
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.ckpt").stat().st_mode & 0o777 == 0o666 & ~umask  # the mode open() would have given it
    (tmp_path / "b.ckpt").write_bytes((tmp_path / "a.ckpt").read_bytes()[:100])
    with pytest.raises(Exception, match=r"b\.ckpt: cannot be read as a checkpoint"):
        read_checkpoint(tmp_path / "b.ckpt")
