"""Shared helpers: compose the real configs, run the real CLI, on tiny data in tmp folders."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from ssl_lab.resolvers import register

register()  # what run.py registers: the configs interpolate these

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Small enough for 2 CPU cores: a few steps of a narrow projector on 32 px images.
TINY = [
    "accelerator=cpu",
    "backbone=resnet15",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "dataset.batch_size=8",
    "dataset.num_workers=0",
    "method.proj_hidden_dims=[32]",
    "method.proj_output_dim=16",
]


def tiny_data(dataset: str, cache: Path) -> list[str]:
    sizes = {"lens_sim": ["dataset.n_per_class=8", "dataset.image_size=32"],
             "jets_sim": ["dataset.n=24", "dataset.image_size=32"]}
    return [f"dataset={dataset}", f"dataset.cache_dir={cache}", *sizes.get(dataset, [])]


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF), job_name="test"):
        return compose(config_name="config", overrides=overrides)


def run_cli(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=600)


def pytest_addoption(parser):
    parser.addoption("--gpu-device", default="cuda", choices=("cuda", "cpu"),
                     help="where the gpu-marked tests run: cuda (deselected without a GPU) or cpu (their CPU "
                          "version, so they cannot rot where no GPU is: benchmarks/gpu_check.py --cpu)")


def pytest_collection_modifyitems(config, items):
    """gpu tests need CUDA: without it they are deselected (counted in pytest's "N deselected"), never skipped."""
    import torch

    if config.getoption("--gpu-device") == "cpu" or torch.cuda.is_available():
        return
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]


@pytest.fixture
def gpu_device(request):
    """The device a gpu-marked test runs on: cuda, or the CPU under --gpu-device=cpu."""
    import torch

    return torch.device(request.config.getoption("--gpu-device"))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "sim_cache"
