"""One command from unlabelled images to a comparison: every stage a run of its own under one run directory."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf, open_dict

from ssl_lab.artifacts import atomic_write, write_json
from ssl_lab.evaluation.compare import write_comparison
from ssl_lab.errors import ConfigError
from ssl_lab.tasks.common import claim_run_dir, labelled_datamodule, resolve_run_dir

log = logging.getLogger(__name__)

STAGES = ("pretrain", "linear", "finetune", "joint", "evaluate", "supervised")


def pipeline(cfg: DictConfig, tasks: dict[str, Callable[[DictConfig], dict[str, Any]]]) -> dict[str, Any]:
    run_dir = resolve_run_dir(cfg)
    claim_run_dir(run_dir, None)
    stages = list(cfg.task.stages)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"task.stages has {unknown}; stages are: {', '.join(STAGES)}.")
    if "pretrain" not in stages and cfg.get("pretrained") in (None, "random"):
        raise ConfigError("task.stages has no pretrain stage: pass pretrained=<run dir> for the other stages.")
    if "joint" in stages and not labelled_datamodule(cfg).target_names:
        log.info("pipeline: dataset %s has no regression targets; skipping the joint stage", cfg.dataset.name)
        stages.remove("joint")

    results: dict[str, Any] = {}
    for stage in stages:
        stage_cfg = cfg.copy()
        with open_dict(stage_cfg):
            stage_cfg.task = OmegaConf.create({"name": "pretrain"}) if stage == "pretrain" else cfg.task[stage]
            stage_cfg.run_dir = str(run_dir / stage)
            if stage == "supervised":
                stage_cfg.pretrained = None  # the from-scratch baseline
                if cfg.task[stage].get("backbone"):
                    stage_cfg.backbone = {"_target_": "ssl_lab.backbones.build_backbone",
                                          "name": cfg.task[stage].backbone, "in_chans": cfg.dataset.in_chans}
            elif "pretrain" in stages and stage != "pretrain":
                stage_cfg.pretrained = str(run_dir / "pretrain")
        log.info("pipeline stage %s -> %s", stage, stage_cfg.run_dir)
        results[stage] = tasks[stage](stage_cfg)
    summary = {"task": "pipeline", "stages": stages, "run_dir": str(run_dir), "results": results}
    write_json(Path(run_dir) / "pipeline.json", summary)  # an index of the stages, not a run of its own
    _, md_path, _ = write_comparison(run_dir)
    lines = [f"# pipeline: {cfg.method.name}, {cfg.backbone.name} on {cfg.dataset.name}", "",
             *(f"- [{stage}]({stage}/report.md)" for stage in stages), "", md_path.read_text()]
    atomic_write(Path(run_dir) / "report.md", lambda tmp: Path(tmp).write_text("\n".join(lines)))
    return summary
