"""The catalogue of bad values the config check refuses at the boundary (ssl_lab.schema): each one exits with status
2 and one line naming the key, what it must be and an example, and nothing is written. On the old code most of
these were tracebacks from deep in Lightning or torch, or runs that trained on a NaN learning rate."""
from __future__ import annotations

import pytest
from conftest import TINY, compose_cfg

from ssl_lab.cli import run_or_exit
from ssl_lab.schema import RULES, check_config

# (override, what the message must say)
BAD = [
    ("seed=-1", "seed=-1 must be an integer >= 0"),
    ("seed=1.5", "seed=1.5 must be an integer >= 0"),
    ("seed=abc", "seed='abc' must be an integer"),
    ("trainer.max_epochs=0", "trainer.max_epochs=0 must be an integer >= 1 (or -1)"),
    ("trainer.max_epochs=-2", "trainer.max_epochs=-2 must be"),
    ("trainer.max_epochs=2.5", "trainer.max_epochs=2.5 must be an integer"),
    ("trainer.max_epochs=ten", "trainer.max_epochs='ten' must be"),
    ("trainer.max_epochs=nan", "trainer.max_epochs=nan must be an integer"),
    ("trainer.max_epochs=true", "trainer.max_epochs=True must be"),
    ("trainer.max_steps=0", "trainer.max_steps=0 must be"),
    ("trainer.max_steps=1e3", "trainer.max_steps=1000.0 must be an integer"),
    ("trainer.limit_train_batches=-1", "trainer.limit_train_batches=-1 must be a number of batches"),
    ("trainer.limit_train_batches=1.5", "must be a number of batches"),
    ("trainer.limit_train_batches=all", "must be a number of batches"),
    ("trainer.limit_train_batches=nan", "must be a number of batches"),
    ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps=0 must be an integer >= 1"),
    ("trainer.log_every_n_steps=often", "trainer.log_every_n_steps='often'"),
    ("trainer.gradient_clip_val=0", "trainer.gradient_clip_val=0 must be a number > 0 (or null)"),
    ("trainer.gradient_clip_val=-1.0", "trainer.gradient_clip_val=-1.0"),
    ("trainer.gradient_clip_val=inf", "must be a finite number"),
    ("trainer.gradient_clip_val=big", "trainer.gradient_clip_val='big'"),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0 must be an integer >= 1"),
    ("trainer.accumulate_grad_batches=2.5", "trainer.accumulate_grad_batches=2.5"),
    ("trainer.deterministic=maybe", "trainer.deterministic='maybe' must be true or false (or 'warn')"),
    ("trainer.deterministic=1", "trainer.deterministic=1 must be true or false"),
    ("trainer.enable_progress_bar=sure", "trainer.enable_progress_bar='sure' must be true or false"),
    ("optim.lr=0", "optim.lr=0 must be a number > 0"),
    ("optim.lr=-0.1", "optim.lr=-0.1 must be a number > 0"),
    ("optim.lr=nan", "optim.lr=nan must be a finite number"),
    ("optim.lr=inf", "optim.lr=inf must be a finite number"),
    ("optim.lr=-inf", "optim.lr=-inf must be a finite number"),
    ("optim.lr=1e-3x", "optim.lr='1e-3x' must be a number > 0"),
    ("optim.lr=true", "optim.lr=True must be a number"),
    ("optim.lr=[0.1]", "optim.lr=[0.1] must be a number"),
    ("optim.lr=null", "optim.lr=None must be a number"),
    ("optim.weight_decay=-1e-4", "optim.weight_decay=-0.0001 must be a number >= 0"),
    ("optim.weight_decay=nan", "optim.weight_decay=nan must be a finite number"),
    ("optim.weight_decay=none", "optim.weight_decay='none' must be a number >= 0"),
    ("optim.warmup_epochs=-1", "optim.warmup_epochs=-1 must be a number >= 0"),
    ("optim.warmup_epochs=inf", "must be a finite number"),
    ("optim.min_lr_ratio=1.5", "optim.min_lr_ratio=1.5 must be a number in [0, 1]"),
    ("optim.min_lr_ratio=-0.1", "optim.min_lr_ratio=-0.1 must be a number in [0, 1]"),
    ("optim.base_batch_size=0", "optim.base_batch_size=0 must be an integer >= 1"),
    ("optim.base_batch_size=256.5", "optim.base_batch_size=256.5"),
    ("optim.betas=[0.9]", "optim.betas=[0.9] must be a list of 2 values"),
    ("optim.betas=[0.9,1.0]", "optim.betas=[0.9, 1.0] holds 1.0, which must be a number in [0, 1)"),
    ("optim.betas=[0.9,nan]", "holds nan, which must be a finite number"),
    ("optim.betas=0.9", "optim.betas=0.9 must be a list of 2 values"),
    ("optim=sgd optim.momentum=1.0", "optim.momentum=1.0 must be a number in [0, 1)"),
    ("optim=sgd optim.momentum=-0.5", "optim.momentum=-0.5 must be a number in [0, 1)"),
    ("optim=lars optim.eta=0", "optim.eta=0 must be a number > 0"),
    ("optim=lars optim.eta=nan", "optim.eta=nan must be a finite number"),
    ("guard.max_bad_steps=-1", "guard.max_bad_steps=-1 must be an integer >= 0"),
    ("guard.max_bad_steps=some", "guard.max_bad_steps='some'"),
    ("guard.check_every_n_steps=0", "guard.check_every_n_steps=0 must be an integer >= 1 (or null)"),
    ("guard.collapse_std=-0.1", "guard.collapse_std=-0.1 must be a number >= 0"),
    ("guard.collapse_std=nan", "guard.collapse_std=nan must be a finite number"),
    ("guard.patience=0", "guard.patience=0 must be an integer >= 1"),
    ("method.temperature=0", "method.temperature=0 must be a number > 0"),
    ("method.temperature=-0.1", "method.temperature=-0.1 must be a number > 0"),
    ("method.temperature=nan", "method.temperature=nan must be a finite number"),
    ("method.temperature=hot", "method.temperature='hot' must be a number > 0"),
    ("method.proj_output_dim=0", "method.proj_output_dim=0 must be an integer >= 1"),
    ("method.proj_output_dim=12.5", "method.proj_output_dim=12.5 must be an integer >= 1"),
    ("method.proj_hidden_dims=[0]", "method.proj_hidden_dims=[0] holds 0, which must be an integer >= 1"),
    ("method.proj_hidden_dims=[32,-4]", "holds -4, which must be an integer >= 1"),
    ("method.proj_hidden_dims=64", "method.proj_hidden_dims=64 must be a list of some values"),
    ("method=byol method.base_tau=1.5", "method.base_tau=1.5 must be a number in [0, 1]"),
    ("method=byol method.base_tau=-0.1", "method.base_tau=-0.1 must be a number in [0, 1]"),
    ("method=byol method.final_tau=nan", "method.final_tau=nan must be a finite number"),
    ("method=byol method.pred_hidden_dims=[0]", "method.pred_hidden_dims=[0] holds 0"),
    ("method=vicreg method.sim_weight=-1", "method.sim_weight=-1 must be a number >= 0"),
    ("method=vicreg method.var_weight=inf", "method.var_weight=inf must be a finite number"),
    ("method=vicreg method.cov_weight=heavy", "method.cov_weight='heavy' must be a number >= 0"),
    ("method=barlow method.lambd=-0.005", "method.lambd=-0.005 must be a number >= 0"),
    ("method=dino method.teacher_temp=0", "method.teacher_temp=0 must be a number > 0"),
    ("method=dino method.student_temp=-1", "method.student_temp=-1 must be a number > 0"),
    ("method=dino method.center_momentum=2", "method.center_momentum=2 must be a number in [0, 1]"),
    ("method=dino method.out_dim=0", "method.out_dim=0 must be an integer >= 1"),
    ("method=dino method.n_local_crops=-2", "method.n_local_crops=-2 must be an integer >= 0"),
    ("method=dino method.freeze_last_layer=-1", "method.freeze_last_layer=-1 must be an integer >= 0"),
    ("method=mae method.mask_ratio=1.0", "method.mask_ratio=1.0 must be a number in (0, 1)"),
    ("method=mae method.mask_ratio=0", "method.mask_ratio=0 must be a number in (0, 1)"),
    ("method=mae method.decoder_dim=0", "method.decoder_dim=0 must be an integer >= 1"),
    ("method=mae method.decoder_depth=0", "method.decoder_depth=0 must be an integer >= 1"),
    ("augment.ops.hflip.p=1.5", "augment.ops.hflip.p=1.5 must be a number in [0, 1]"),
    ("augment.ops.vflip.p=-0.5", "augment.ops.vflip.p=-0.5 must be a number in [0, 1]"),
    ("augment.ops.noise.p=nan", "augment.ops.noise.p=nan must be a finite number"),
    ("augment.ops.blur.p=often", "augment.ops.blur.p='often' must be a number in [0, 1]"),
    ("augment.size=0", "augment.size=0 must be an integer >= 1 (or null)"),
    ("augment.size=16.5", "augment.size=16.5 must be an integer >= 1 (or null)"),
    ("augment.n_views=0", "augment.n_views=0 must be an integer >= 1"),
    ("accelerator.num_nodes=0", "accelerator.num_nodes=0 must be an integer >= 1"),
    ("accelerator.compile=sometimes", "accelerator.compile='sometimes' must be true or false"),
    ("accelerator.sync_batchnorm=2", "accelerator.sync_batchnorm=2 must be true or false"),
    ("task=finetune task.max_epochs=0", "task.max_epochs=0 must be an integer >= 1"),
    ("task=finetune task.head_lr=0", "task.head_lr=0 must be a number > 0"),
    ("task=finetune task.backbone_lr=-1e-4", "task.backbone_lr=-0.0001 must be a number >= 0"),
    ("task=finetune task.backbone_lr=nan", "task.backbone_lr=nan must be a finite number"),
    ("task=finetune task.dropout=1.0", "task.dropout=1.0 must be a number in [0, 1)"),
    ("task=finetune task.hidden_dims=[0]", "task.hidden_dims=[0] holds 0"),
    ("task=joint task.regression_weight=-1", "task.regression_weight=-1 must be a number >= 0"),
    ("task=linear task.lrs=[0.1,0]", "task.lrs=[0.1, 0] holds 0, which must be a number > 0"),
    ("task=linear task.lrs=0.1", "task.lrs=0.1 must be a list of some values"),
    ("task=linear task.weight_decays=[-1e-4]", "task.weight_decays=[-0.0001] holds -0.0001"),
    ("task=linear task.batch_size=0", "task.batch_size=0 must be an integer >= 1"),
    ("task=linear task.aug_passes=-1", "task.aug_passes=-1 must be an integer >= 0"),
    ("task=evaluate task.knn_k=[0]", "task.knn_k=[0] holds 0, which must be an integer >= 1"),
    ("task=evaluate task.knn_temperature=0", "task.knn_temperature=0 must be a number > 0"),
    ("dataset.val_fraction=nan", "must be"),  # the data module's own check, before any file is read
    ("+method.extra_scale=nan", "method.extra_scale=nan must be a finite number"),  # any number: finite
    ("run_name=../outside", "run_name='../outside' must name a folder inside the runs folder"),
    ("run_name=/abs/run", "run_name='/abs/run' must name a folder inside the runs folder"),
    ("run_name=a/../../b", "must name a folder inside the runs folder"),
    ("run_name=", "run_name='' must name a folder inside the runs folder"),
]


def _tiny(override: str) -> list[str]:
    """TINY, less the projector sizes for MAE (it has no projector)."""
    return [a for a in TINY if not ("method=mae" in override and a.startswith("method.proj"))]


@pytest.mark.parametrize("override,expected", BAD, ids=[b[0] for b in BAD])
def test_bad_value_is_one_line_exit_2_and_nothing_is_written(override, expected, tmp_path, cache_dir, capsys):
    run_dir = tmp_path / "run"
    overrides = [*_tiny(override), "dataset=lens_sim", f"dataset.cache_dir={cache_dir}", "dataset.n_per_class=8",
                 "dataset.image_size=32", *override.split(" "), *(() if override.startswith("run_name") else
                                                                    (f"run_dir={run_dir}",))]
    with pytest.raises(SystemExit) as exit_info:
        run_or_exit(compose_cfg(overrides))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("ssl_lab: error:") == 1 and "Traceback" not in err and err.strip().count("\n") == 0
    assert expected in err, err
    assert not run_dir.exists() and not list(tmp_path.iterdir())  # nothing written, anywhere


def test_every_rule_matches_a_key_of_some_config_and_the_defaults_pass(cache_dir):
    """A rule whose pattern matches nothing would check nothing: each one names a key that some config group sets;
    and the shipped configs pass every rule."""
    import fnmatch

    from ssl_lab.resume import flat_keys

    groups = ["", "method=byol", "method=vicreg", "method=barlow", "method=dino", "method=mae", "optim=sgd",
              "optim=lars", "task=finetune", "task=joint", "task=linear", "task=evaluate"]
    keys: set[str] = set()
    for group in groups:
        cfg = compose_cfg([*_tiny(group), f"dataset.cache_dir={cache_dir}", *([group] if group else [])])
        check_config(cfg)
        from omegaconf import OmegaConf

        keys |= set(flat_keys(OmegaConf.to_container(cfg, resolve=True)))
    unused = [p for p in RULES if not any(fnmatch.fnmatchcase(k, p) for k in keys)]
    assert not unused, unused
