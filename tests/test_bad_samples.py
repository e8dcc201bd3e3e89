"""dataset.bad_samples: a sample that goes bad mid-run stops it with its checkpoint saved and one line (error), or is
dropped and counted (skip); a DataLoader worker that dies ends in one line too. On the old code each was a worker
traceback and the steps since the last epoch's checkpoint were lost."""
from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
import torch
from conftest import TINY, compose_cfg, run_cli
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ssl_lab.artifacts import load_backbone_file
from ssl_lab.checkpoint_io import read_checkpoint
from ssl_lab.data.bad_samples import SkipBadSamples, check_bad_samples, skip_collate
from ssl_lab.errors import ConfigError, DataError
from ssl_lab.tasks import TASKS


class Flaky(Dataset):
    def __init__(self, n, bad):
        self.n, self.bad = n, set(bad)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i in self.bad:
            raise DataError(f"sample {i}: cannot be read")
        return {"x": torch.full((2,), float(i))}


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_drops_and_counts_exactly_across_workers(workers):
    ds = SkipBadSamples(Flaky(20, bad=[3, 7, 11]), cap=5, split="train")
    loader = DataLoader(ds, batch_size=4, num_workers=workers, collate_fn=skip_collate)
    seen = sorted(int(v) for batch in loader for v in batch["x"][:, 0])
    assert seen == [i for i in range(20) if i not in (3, 7, 11)]
    assert ds.count() == 3 and ds.examples() == [3, 7, 11]  # no file names in this dataset: indices
    list(loader)  # a second epoch finds the same samples: still 3
    assert ds.count() == 3


def test_skip_stops_past_the_cap_and_on_an_empty_batch():
    ds = SkipBadSamples(Flaky(10, bad=[1, 2, 3]), cap=2, split="train")
    with pytest.raises(DataError, match=r"3 unreadable samples in the train split, more than "
                                        r"dataset.max_bad_samples=2 allows; the last: sample 3: cannot be read"):
        list(DataLoader(ds, batch_size=5, collate_fn=skip_collate))
    with pytest.raises(DataError, match="every sample of a batch of 2 was unreadable"):
        list(DataLoader(SkipBadSamples(Flaky(2, bad=[0, 1]), cap=9, split="val"), batch_size=2,
                        collate_fn=skip_collate))


def test_bad_sample_options_are_checked():
    assert check_bad_samples("skip", 0) == ("skip", 0)
    with pytest.raises(ConfigError, match=r"dataset.bad_samples='drop' is not one of error, skip"):
        check_bad_samples("drop", 1)
    with pytest.raises(ConfigError, match=r"dataset.max_bad_samples='10' must be an integer >= 0"):
        check_bad_samples("skip", "10")


def _folder(root, n=20):
    root.mkdir()
    rng = np.random.default_rng(0)
    files = []
    for i in range(n):
        path = root / f"img_{i:02d}.png"
        Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(path)
        files.append(str(path))
    return files


def _args(root, run_dir, corrupt, once, *extra):
    tiny = [a for a in TINY if not a.startswith(("trainer.max_epochs", "dataset.batch_size"))]
    return [*tiny, "dataset=mri", f"dataset.root={root}", "dataset.in_chans=1", "dataset.image_size=32",
            "dataset.decode_cache=false", "dataset.batch_size=4", "trainer.max_epochs=3",
            "trainer.limit_train_batches=null", "+callbacks.bad._target_=tests.fault_at.CorruptFiles",
            f"+callbacks.bad.files=[{','.join(corrupt)}]", "+callbacks.bad.step=2", f"+callbacks.bad.once={once}",
            f"run_dir={run_dir}", *extra]


@pytest.mark.slow
def test_error_saves_the_checkpoint_first_names_the_file_and_the_run_continues(tmp_path):
    files = _folder(tmp_path / "imgs")
    run_dir = tmp_path / "run"
    good = {f: open(f, "rb").read() for f in files}
    failed = run_cli(_args(tmp_path / "imgs", run_dir, files, tmp_path / "once", "dataset.num_workers=2"), tmp_path)
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert "Traceback" not in failed.stderr
    line = failed.stderr.strip().splitlines()[-1]
    assert line.startswith("ssl_lab: error: ") and "img_" in line and "cannot be read as an image" in line
    step = int(line.split("The checkpoint of step ")[1].split()[0])
    assert step >= 3 and read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == step
    assert f"run_dir={run_dir} resume=auto" in line and "dataset.bad_samples=skip" in line
    assert not (run_dir / "summary.json").exists()
    for f, data in good.items():  # the data fixed
        open(f, "wb").write(data)
    done = run_cli([f"run_dir={run_dir}", "resume=auto"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_step"] == summary["data"]["n_train"] // 4 * 3  # every step of 3 epochs, none twice
    (tmp_path / "never").touch()  # the same run, never corrupted: the continued run ends with its weights
    ref = run_cli(_args(tmp_path / "imgs", tmp_path / "ref", files, tmp_path / "never", "dataset.num_workers=2"),
                  tmp_path)
    assert ref.returncode == 0, ref.stderr[-3000:]
    a, b = load_backbone_file(tmp_path / "ref")["state_dict"], load_backbone_file(run_dir)["state_dict"]
    assert all(a[k].equal(b[k]) for k in a)


@pytest.mark.slow
def test_skip_drops_bad_files_counts_them_in_the_summary(tmp_path):
    files = _folder(tmp_path / "imgs")
    run_dir = tmp_path / "run"
    corrupt = files[:3]
    done = run_cli(_args(tmp_path / "imgs", run_dir, corrupt, tmp_path / "once", "dataset.bad_samples=skip",
                         "dataset.num_workers=2"), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    # the images pretraining reads
    in_train = set(json.loads((run_dir / "splits.json").read_text())["splits"]["fit"]["files"])
    expected = sum(os.path.basename(f) in {os.path.basename(i) for i in in_train} for f in corrupt)
    assert summary["bad_samples"]["policy"] == "skip" and summary["bad_samples"]["skipped"]["train"] == expected
    assert sorted(summary["bad_samples"]["examples"]["train"]) == sorted(f for f in corrupt if os.path.basename(f) in
                                                                         {os.path.basename(i) for i in in_train})
    assert expected > 0 and summary["global_step"] == summary["data"]["n_train"] // 4 * 3


def test_a_dead_worker_is_one_line(tmp_path, cache_dir, monkeypatch):
    """A worker killed (as the OOM killer does) mid-run: the checkpoint of the last step and one line."""
    from ssl_lab.data import h5

    real = h5.H5Dataset.__getitem__

    def dies(self, i):
        from torch.utils.data import get_worker_info

        if get_worker_info() is not None and os.path.exists(tmp_path / "armed"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, i)

    class Arm(__import__("lightning.pytorch", fromlist=["Callback"]).Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 2:
                (tmp_path / "armed").touch()

    monkeypatch.setattr(h5.H5Dataset, "__getitem__", dies)
    run_dir = tmp_path / "run"
    cfg = compose_cfg([*TINY, "dataset=lens_sim", f"dataset.cache_dir={cache_dir}", "dataset.n_per_class=8",
                       "dataset.image_size=32", "dataset.in_memory=true",
                       "dataset.num_workers=1", "dataset.batch_size=2", "trainer.limit_train_batches=null",
                       f"run_dir={run_dir}"])
    import sys

    pretrain_module = sys.modules["ssl_lab.tasks.pretrain"]  # the package's `pretrain` is the function
    monkeypatch.setattr(pretrain_module, "targets", lambda group: [])  # no user callbacks; add ours below
    real_kwargs = pretrain_module.trainer_kwargs
    monkeypatch.setattr(pretrain_module, "trainer_kwargs",
                        lambda cfg, precision, callbacks, **kw: real_kwargs(cfg, precision,
                                                                            callbacks=[*callbacks, Arm()], **kw))
    with pytest.raises(DataError) as err:
        TASKS["pretrain"](cfg)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("a DataLoader worker process died (pid ")
    assert "lower dataset.num_workers or dataset.batch_size" in msg
    step = int(msg.split("The checkpoint of step ")[1].split()[0])
    assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == step >= 2
