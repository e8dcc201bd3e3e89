"""Built-in simulated data sets: generated once into a cache file, then read exactly like a user's HDF5 file."""
from __future__ import annotations

import contextlib
import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import h5py

from ssl_lab.artifacts import atomic_path
from ssl_lab.data.h5 import H5DataModule
from ssl_lab.errors import ConfigError


@contextlib.contextmanager
def atomic_h5(path: str | Path) -> Iterator[h5py.File]:
    """An HDF5 file that appears under `path` only once fully written (another process never reads half a file)."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        yield f


def sim_cache_path(cache_dir: str | Path, name: str, params: Mapping[str, Any]) -> Path:
    """cache_dir/<name>-<hash>.h5: a pure function of the simulator knobs, so every process agrees on the file."""
    digest = hashlib.sha1(json.dumps(dict(params), sort_keys=True).encode()).hexdigest()[:10]
    return Path(cache_dir).expanduser().absolute() / f"{name}-{digest}.h5"


def check_sim_args(**values: int) -> None:
    """Refuse sizes the simulators cannot honour before anything is written."""
    for option, value in values.items():
        low = 8 if option == "image_size" else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"dataset.{option}={value!r} must be an integer >= {low}.")


class SimulatedDataModule(H5DataModule, ABC):
    """The file's path is fixed by the simulator knobs at construction, so setup works in every process even when
    prepare_data (which writes the file if it is missing) ran in another."""

    def __init__(self, sim_params: Mapping[str, Any], cache_dir: str, **h5_kwargs: Any) -> None:
        super().__init__(path=str(sim_cache_path(cache_dir, h5_kwargs["name"], sim_params)), **h5_kwargs)
        self.sim_params = dict(sim_params)

    @abstractmethod
    def simulate(self, path: str) -> None:
        """Write the simulated file to `path`."""

    def prepare_data(self) -> None:
        if not Path(self.path).is_file():
            self.simulate(self.path)

    def _summary_extra(self) -> dict[str, Any]:
        return {**super()._summary_extra(), "simulator": dict(self.sim_params)}
