"""Every choice of every config group composes, and the objects it names can be built."""
from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import CONF, compose_cfg, run_cli
from ssl_lab.augment import Augment

GROUPS = ("task", "method", "backbone", "dataset", "augment", "optim", "accelerator", "logger", "experiment",
          "hparams_search")


def choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,choice", [(g, c) for g in GROUPS for c in choices(g)])
def test_every_choice_composes(group, choice):
    cfg = compose_cfg([f"{group}={choice}"])
    if group in ("experiment", "hparams_search"):  # merged at the top level: it must change the composed config
        assert OmegaConf.to_container(cfg) != OmegaConf.to_container(compose_cfg([]))
    elif "name" in cfg[group]:
        assert cfg[group].name == choice
    # Interpolations resolve (e.g. backbone.in_chans follows dataset.in_chans).
    assert cfg.backbone.in_chans == cfg.dataset.in_chans


def test_defaults_are_the_cpu_friendly_demo():
    cfg = compose_cfg([])
    assert (cfg.task.name, cfg.method.name, cfg.dataset.name, cfg.augment.name) == (
        "pretrain", "simclr", "lens_sim", "physics")
    assert cfg.dataset.in_chans == 1


@pytest.mark.parametrize("choice", choices("backbone"))
def test_every_backbone_choice_builds_for_the_dataset_channels(choice):
    cfg = compose_cfg([f"backbone={choice}", "dataset=jets_sim"])
    backbone = instantiate(cfg.backbone, image_size=32)
    assert backbone.in_chans == 8 and backbone.num_features > 0


@pytest.mark.parametrize("choice", choices("augment"))
def test_every_augment_choice_builds(choice):
    cfg = compose_cfg([f"augment={choice}"])
    aug = instantiate(cfg.augment, _convert_="all")
    assert isinstance(aug, Augment) and aug.n_views == 2


@pytest.mark.parametrize("choice", choices("dataset"))
def test_every_dataset_choice_names_a_datamodule(choice):
    overrides = [f"dataset={choice}"]
    cfg = compose_cfg(overrides)
    for key in ("path", "root"):
        if key in cfg.dataset.keys() and OmegaConf.is_missing(cfg.dataset, key):
            overrides.append(f"dataset.{key}=/nonexistent")
    dm = instantiate(compose_cfg(overrides).dataset)  # constructors only store arguments: no I/O here
    assert dm.in_chans == cfg.dataset.in_chans


def test_unknown_choice_and_unknown_key_fail_at_composition():
    with pytest.raises(ConfigCompositionException, match="method/nosuch"):
        compose_cfg(["method=nosuch"])
    with pytest.raises(ConfigCompositionException, match="lr_typo"):
        compose_cfg(["optim.lr_typo=0.1"])


def test_help_lists_groups_and_choices(tmp_path):
    out = run_cli(["--help"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for group in GROUPS:
        assert f"{group}: " in out.stdout
    methods = next(line for line in out.stdout.splitlines() if line.strip().startswith("method: "))
    assert sorted(methods.split(":", 1)[1].replace(",", " ").split()) == choices("method")
    assert "jets_sim" in out.stdout and "lens_h5" in out.stdout
