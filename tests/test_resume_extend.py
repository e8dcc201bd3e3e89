"""resume=extend trains a run longer on a re-planned schedule, resume=force continues it with a changed config; each
change is a segment whose config, weights and results are kept. On the old code a longer max_epochs restored the
finished schedule (lr 0: the weights did not move) and a changed lr was silently dropped."""
from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml
from conftest import TINY, compose_cfg, run_cli, tiny_data

from ssl_lab.artifacts import load_backbone_file
from ssl_lab.errors import ConfigError
from ssl_lab.optim import warmup_cosine
from ssl_lab.tasks import TASKS

pytestmark = pytest.mark.slow

LR_LOG = ["+callbacks.lr._target_=lightning.pytorch.callbacks.LearningRateMonitor",
          "+callbacks.lr.logging_interval=step"]


def _base(cache_dir, run_dir, *extra):
    return [*TINY, *tiny_data("lens_sim", cache_dir), "optim.warmup_epochs=0.5", *LR_LOG, f"run_dir={run_dir}",
            *extra]


def _logged_lrs(run_dir, version):
    """The lr of the first parameter group at each step of one segment's CSV log."""
    with open(run_dir / "logs" / f"version_{version}" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    key = next(k for k in rows[0] if k.startswith("lr-") and not k.endswith("pg2"))
    return [float(r[key]) for r in rows if r.get(key)]


def _files(run_dir):
    return {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


def test_extend_trains_past_the_old_end_on_the_replanned_cosine(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    first = TASKS["pretrain"](compose_cfg(_base(cache_dir, run_dir)))
    assert first["global_step"] == 2
    first_backbone = (run_dir / "backbone.pt").read_bytes()

    # what a user types: the run directory, the mode and the new length; nothing else is repeated
    done = run_cli([f"run_dir={run_dir}", "resume=extend", "trainer.max_epochs=3"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_step"] == 6 and summary["resumed_from"].endswith("last.ckpt")

    # the schedule is the one a 3-epoch run plans (6 steps, warmup 0.5 epoch = 1 step), from step 2 on
    lr = float(yaml.safe_load((run_dir / "config.yaml").read_text())["scale"]["lr"])
    assert _logged_lrs(run_dir, 1) == pytest.approx([lr * warmup_cosine(s, 6, 1) for s in range(2, 6)])
    assert _logged_lrs(run_dir, 1)[0] > 0.5 * lr  # not the finished 1-epoch schedule's lr of 0

    before = load_backbone_file(run_dir / "backbone.1.pt")["state_dict"]
    after = load_backbone_file(run_dir / "backbone.pt")["state_dict"]
    assert (run_dir / "backbone.1.pt").read_bytes() == first_backbone  # segment 1's weights are kept
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())

    configs = {n: yaml.safe_load((run_dir / n).read_text())["trainer"]["max_epochs"]
               for n in ("config.1.yaml", "config.2.yaml", "config.yaml")}
    assert configs == {"config.1.yaml": 1, "config.2.yaml": 3, "config.yaml": 3}
    one, two = summary["segments"]
    assert one["mode"] == "new" and one["summary"]["global_step"] == 2 and one["kept"] == ["backbone.1.pt"]
    assert two["mode"] == "extend" and two["from_step"] == 2 and two["from_epoch"] == 1
    assert two["changed"] == {"trainer.max_epochs": [1, 3]}


def test_extend_and_force_refuse_what_they_cannot_do_and_write_nothing(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    base = _base(cache_dir, run_dir, "trainer.max_epochs=2")
    TASKS["pretrain"](compose_cfg(base))
    before = _files(run_dir)
    cases = [
        (["resume=extend", "trainer.max_epochs=4", "optim.lr=0.01"],
         r"resume=extend changes only where the run ends .*\(optim\.lr: 0\.001 -> 0\.01\).*use resume=force"),
        (["resume=extend", "trainer.max_epochs=2"], None),  # the same length: nothing to change, nothing refused
        (["resume=extend", "trainer.max_epochs=1"], r"has trained 2 epoch\(s\) already; trainer\.max_epochs=1 does "
                                                    r"not go past them"),
        (["resume=force", "method=byol", "method.pred_hidden_dims=[32]"],
         r"resume=force: method\.name: 'simclr' -> 'byol' cannot change in a resumed run"),
        (["resume=auto", "trainer.max_epochs=4"], r"train longer with resume=extend, change it with resume=force"),
    ]
    for extra, message in cases:
        cfg = compose_cfg([*base, *extra])
        if message is None:
            assert TASKS["pretrain"](cfg)["global_step"] == 4
            before = _files(run_dir)  # a finished run continued to its own end rewrites its summary
            continue
        with pytest.raises(ConfigError, match=message):
            TASKS["pretrain"](cfg)
        assert _files(run_dir) == before, extra
    assert not (run_dir / "segments.json").exists()
    with pytest.raises(ConfigError, match=r"resume=extend: .*empty holds no run to continue"):
        TASKS["pretrain"](compose_cfg(_base(cache_dir, tmp_path / "empty", "resume=extend")))
    assert not (tmp_path / "empty").exists()


def test_force_applies_a_new_lr_to_the_restored_optimizer(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    base = _base(cache_dir, run_dir, "optim.schedule=constant", "optim.warmup_epochs=0")
    TASKS["pretrain"](compose_cfg(base))
    assert _logged_lrs(run_dir, 0) == pytest.approx([1e-3, 1e-3])
    TASKS["pretrain"](compose_cfg([*base, "resume=force", "optim.lr=0.0002", "optim.weight_decay=0.01",
                                   "trainer.max_epochs=2"]))
    assert _logged_lrs(run_dir, 1) == pytest.approx([2e-4, 2e-4])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["segments"][1]["mode"] == "force"
    assert summary["segments"][1]["changed"] == {"optim.lr": [0.001, 0.0002], "optim.weight_decay": [1e-6, 0.01],
                                                 "trainer.max_epochs": [1, 2]}
    assert yaml.safe_load((run_dir / "config.1.yaml").read_text())["optim"]["lr"] == 0.001


def test_extend_a_downstream_run_keeps_the_first_segments_model_and_metrics(tmp_path, cache_dir):
    run_dir = tmp_path / "sup"
    base = [*TINY, *tiny_data("lens_sim", cache_dir), "task=supervised", "task.max_epochs=1", f"run_dir={run_dir}"]
    TASKS["supervised"](compose_cfg(base))  # keep_last=false: last.ckpt removed at the clean end
    outputs = _files(run_dir)
    with pytest.raises(ConfigError, match="keep_last=true"):
        TASKS["supervised"](compose_cfg([*base, "resume=extend", "task.max_epochs=2"]))
    assert _files(run_dir) == outputs  # the refusal writes nothing

    base = [*base[:-1], f"run_dir={tmp_path / 'kept'}", "keep_last=true"]
    run_dir = tmp_path / "kept"
    TASKS["supervised"](compose_cfg(base))
    first_metrics = json.loads((run_dir / "metrics.json").read_text())
    TASKS["supervised"](compose_cfg([*base, "resume=extend", "task.max_epochs=2"]))
    assert (run_dir / "model.1.pt").is_file() and (run_dir / "model.pt").is_file()
    segments = json.loads((run_dir / "segments.json").read_text())["segments"]
    assert segments[0]["metrics"] == {k: v for k, v in first_metrics.items() if k not in ("data", "segments")}
    assert segments[1]["changed"] == {"task.max_epochs": [1, 2]}
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 2
