"""Labels that are not 0..K-1: refused in labelled mode (a head would have classes no sample trains) unless
dataset.label_map maps them; the map relabels every split the same way and names the classes."""
import h5py
import numpy as np
import pytest
import torch

from ssl_lab.data.h5 import H5DataModule
from ssl_lab.errors import ConfigError, DataError


def labelled(path, labels, class_names=None, **kw):
    x = np.random.default_rng(0).random((len(labels), 1, 4, 4), dtype=np.float32)
    with h5py.File(path, "w") as f:
        f["images"] = x
        f["y"] = np.asarray(labels)
        if class_names is not None:
            f["y"].attrs["class_names"] = class_names
    dm = H5DataModule("t", str(path), 1, label_key="y", batch_size=2, num_workers=0, labelled=True,
                      val_fraction=0.2, test_fraction=0.2, **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


GAPPY = np.repeat([0, 2, 5], 10)


def test_labels_with_gaps_are_refused_with_a_map_to_use(tmp_path):
    with pytest.raises(DataError, match=r"labels reach 5 but class id\(s\) \[1, 3, 4\] never occur.*"
                                        r"dataset.label_map=\{0: 0, 2: 1, 5: 2\}"):
        labelled(tmp_path / "a.h5", GAPPY)
    with pytest.raises(DataError, match=r"class_names lists 4 classes but class id\(s\) \[3\] never occur"):
        labelled(tmp_path / "b.h5", np.repeat([0, 1, 2], 10), class_names=["a", "b", "c", "d"])


def test_pretraining_does_not_refuse_label_gaps(tmp_path):
    x = np.zeros((30, 1, 4, 4), np.float32) + np.arange(30, dtype=np.float32)[:, None, None, None]
    with h5py.File(tmp_path / "p.h5", "w") as f:
        f["images"], f["y"] = x, GAPPY
    dm = H5DataModule("t", str(tmp_path / "p.h5"), 1, label_key="y", batch_size=2, num_workers=0)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_indices) > 0


def test_label_map_relabels_every_split_and_names_the_classes(tmp_path):
    dm = labelled(tmp_path / "m.h5", GAPPY, class_names=["no_sub", "x", "cdm", "y", "z", "vortex"],
                  label_map={0: 0, 2: 1, 5: 2})
    assert dm.num_classes == 3 and dm.class_names == ["no_sub", "cdm", "vortex"]
    for split in (dm.train_set, dm.val_set, dm.test_set):
        for i in range(len(split)):
            row = int(split.indices[i]) if hasattr(split, "indices") else None
            y = int(split[i]["y"])
            assert y in (0, 1, 2)
            if row is not None:
                assert y == {0: 0, 2: 1, 5: 2}[int(GAPPY[row])]
    merged = labelled(tmp_path / "n.h5", np.repeat([1, 2, 7], 10), label_map={"1": 0, "2": 0, "7": 1})
    assert merged.num_classes == 2 and merged.class_names == ["1+2", "7"]
    ys = torch.stack([merged.train_set[i]["y"] for i in range(len(merged.train_set))])
    assert set(ys.tolist()) == {0, 1}


@pytest.mark.parametrize("label_map,expected", [
    ({0: 0, 2: 2}, ConfigError), ({"a": 0}, ConfigError), ([0, 1], ConfigError), ({0: 0, 2: 1}, DataError),
])
def test_bad_label_maps_are_refused(tmp_path, label_map, expected):
    with pytest.raises(expected, match="label_map"):
        labelled(tmp_path / "c.h5", GAPPY, label_map=label_map)
