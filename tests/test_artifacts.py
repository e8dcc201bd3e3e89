"""backbone.pt is safe to load (weights_only) and every broken file is named with what is wrong."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from ssl_lab.artifacts import atomic_write, load_backbone_file, save_backbone, write_json
from ssl_lab.errors import DataError


def test_backbone_round_trip_with_weights_only(tmp_path):
    net = nn.Conv2d(3, 4, 3)
    path = save_backbone(tmp_path / "backbone.pt", net, {"name": "conv", "in_chans": 3, "norm": {"mean": [0.5]}})
    raw = torch.load(path, weights_only=True)  # the safe loader accepts the whole file
    assert raw["meta"]["in_chans"] == 3
    payload = load_backbone_file(tmp_path)  # a run directory works too
    torch.testing.assert_close(payload["state_dict"]["weight"], net.weight.detach())


def test_truncated_file_is_named(tmp_path):
    path = save_backbone(tmp_path / "backbone.pt", nn.Linear(64, 64), {"name": "x"})
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match="backbone.pt.*corrupt or truncated"):
        load_backbone_file(path)


class Pickled:
    """An arbitrary object in a backbone file: what a weights-only load must refuse."""


def test_file_with_pickled_objects_is_refused_without_unsafe_advice(tmp_path):
    path = tmp_path / "backbone.pt"
    torch.save({"format": "ssl_lab.backbone", "obj": Pickled()}, path)
    with pytest.raises(DataError, match="refuses to unpickle") as info:
        load_backbone_file(path)
    assert "weights_only=False" not in str(info.value) and "\n" not in str(info.value)


def test_foreign_checkpoint_is_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"model": {"w": torch.zeros(1)}}, path)
    with pytest.raises(DataError, match="not an ssl_lab backbone file"):
        load_backbone_file(path)
    with pytest.raises(DataError, match="no such backbone file"):
        load_backbone_file(tmp_path / "missing.pt")


def test_atomic_write_keeps_old_file_when_writer_dies(tmp_path):
    path = write_json(tmp_path / "summary.json", {"v": 1})

    def dying_writer(tmp):
        with open(tmp, "w") as fh:
            fh.write("{half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, dying_writer)
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary file left behind


def test_a_broken_or_foreign_model_file_is_named(tmp_path):
    from ssl_lab.model_file import load_model_file

    with pytest.raises(DataError, match="no such model file"):
        load_model_file(tmp_path)
    save_backbone(tmp_path / "model.pt", nn.Linear(4, 4), {"name": "x"})  # a backbone.pt under the wrong name
    with pytest.raises(DataError, match="not an ssl_lab model file.*pretrained="):
        load_model_file(tmp_path / "model.pt")
    (tmp_path / "model.pt").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="model.pt: cannot be read as a model file"):
        load_model_file(tmp_path)


def test_out_of_space_inside_torch_writer_is_disk_full_and_keeps_the_old_file(tmp_path, monkeypatch):
    """torch's zip writer reports a full disk as a RuntimeError ("unexpected pos"): told apart by the free space."""
    import shutil
    from collections import namedtuple

    from ssl_lab.errors import DiskFull

    path = tmp_path / "w.pt"
    atomic_write(path, lambda tmp: torch.save({"a": torch.ones(3)}, tmp))
    before = path.read_bytes()

    def full_disk(tmp):
        Path(tmp).write_bytes(b"PK partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10 << 30, 10 << 30, 1 << 20))
    with pytest.raises(DiskFull, match=r"w\.pt: no space left on the disk while writing it; the previous w\.pt is "
                                       r"intact\. Free space there"):
        atomic_write(path, full_disk)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["w.pt"]
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10 << 30, 1 << 30, 9 << 30))
    with pytest.raises(RuntimeError, match="unexpected pos"):  # a disk with room: some other torch failure
        atomic_write(path, full_disk)
