"""Shared pieces of every data module: loaders, resumable shuffling, splits and streamed channel statistics."""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ssl_lab.data.bad_samples import SkipBadSamples, check_bad_samples, skip_collate
from ssl_lab.data.resumable import PositionedLoader
from ssl_lab.errors import ConfigError, DataError

log = logging.getLogger(__name__)

NAN_POLICIES = ("error", "zero", "drop")


class EpochSeededSampler(Sampler[int]):
    """Shuffles with a generator seeded by (seed, epoch), so a resumed run replays the same order as an unbroken one.

    It also shards for DDP (rank ``rank`` of ``world`` takes every world-th index of the padded permutation, as
    torch's DistributedSampler does), and can start an epoch part-way through: a run stopped mid-epoch resumes
    with exactly the samples it had not trained on yet. That needs the shard before the skip, which Lightning's
    own sampler wrapper would hide, so the Trainer runs with ``use_distributed_sampler=False``.
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world: int = 1) -> None:
        if n < 0:
            raise ValueError(f"EpochSeededSampler needs n >= 0, got {n}")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, {world})")
        self.n = int(n)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.rank, self.world = int(rank), int(world)
        self.epoch = 0
        self._skip: tuple[int, int] | None = None  # (epoch, samples of this rank's shard already used)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def skip(self, epoch: int, samples: int) -> None:
        """Leave out the first ``samples`` of this rank's order in ``epoch`` (once: a later pass is whole)."""
        self._skip = (int(epoch), int(samples)) if samples > 0 else None

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed((self.seed * 1_000_003 + self.epoch) % (2**63 - 1))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        if self.world > 1 and order:
            total = len(self) * self.world  # padded by wrapping around, so every rank gets as many
            order = (order * (-(-total // len(order))))[:total][self.rank :: self.world]
        if self._skip is not None and self._skip[0] == self.epoch:
            order = order[self._skip[1] :]
            self._skip = None
        return iter(order)

    def __len__(self) -> int:
        """Samples per rank in a whole epoch (also when this pass starts part-way)."""
        return -(-self.n // self.world)


def worker_init(worker_id: int) -> None:
    """DataLoader workers leave preemption signals to the main process, which saves a checkpoint before it exits
    (a worker killed by SIGTERM would abort the step with a DataLoader error first); Lightning's seeding as usual."""
    import signal

    from lightning.fabric.utilities.seed import pl_worker_init_function

    for sig in ("SIGTERM", "SIGUSR1", "SIGUSR2"):
        if hasattr(signal, sig):
            signal.signal(getattr(signal, sig), signal.SIG_IGN)
    pl_worker_init_function(worker_id)


def _real(value: Any) -> float:
    """The value as a float, or NaN for anything that is not a real number (a string from the command line)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return math.nan
    return float(value)


def check_fraction(val_fraction: float) -> float:
    """Reject a val_fraction that would leave no training data (or is not a fraction at all)."""
    if not 0.0 <= _real(val_fraction) < 1.0:
        raise ConfigError(f"dataset.val_fraction={val_fraction!r} is not in [0, 1); use e.g. "
                          "dataset.val_fraction=0.2.")
    return float(val_fraction)


def check_labelled_fractions(test_fraction: float, label_fraction: float) -> tuple[float, float]:
    """Both fractions are checked in every mode, so a bad value fails at construction rather than mid-pipeline."""
    if not 0.0 < _real(test_fraction) < 1.0:
        raise ConfigError(
            f"dataset.test_fraction={test_fraction} is not in (0, 1): the test split is that fraction of the labelled "
            "samples and the rest must hold training data; use e.g. dataset.test_fraction=0.2."
        )
    if not 0.0 < _real(label_fraction) <= 1.0:
        raise ConfigError(
            f"dataset.label_fraction={label_fraction} is not in (0, 1]: it is the share of the training labels kept "
            "(e.g. 0.1 for a 10% label-efficiency run, 1.0 for all)."
        )
    return float(test_fraction), float(label_fraction)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_classes(labels: np.ndarray, where: str, fix: str, names: list[str] | None = None) -> None:
    """Labelled (downstream) mode needs two classes at least: with one, accuracy is 1 whatever the backbone."""
    present = np.unique(labels).tolist()
    if len(present) < 2:
        found = [names[c] for c in present] if names else present
        raise DataError(f"{where}: 1 class found ({', '.join(map(str, found))}); a classification task needs at "
                        f"least 2 classes. {fix}")


def _class_groups(idx: np.ndarray, labels: np.ndarray | None) -> list[tuple[int, np.ndarray]]:
    if labels is None:
        return [(0, idx)]
    lab = labels[idx]
    return [(int(c), idx[lab == c]) for c in np.unique(lab)]


def carve(
    idx: np.ndarray, labels: np.ndarray | None, fraction: float, seed: int, salt: int, need_one: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``idx`` into (rest, carved): about ``fraction`` of every class (of all when labels is None).

    Every class keeps at least one sample in ``rest`` (the training side); with ``need_one`` every class of two or
    more samples also gets at least one carved sample (so each class is evaluated). Returns sorted int64 arrays.
    """
    rng = np.random.default_rng([int(seed), salt])
    rest, taken = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for _, members in _class_groups(np.asarray(idx, np.int64), labels):
        n = len(members)
        k = max(0, min(int(round(fraction * n)), n - 1))
        if need_one and n >= 2:
            k = max(k, 1)
        perm = members[rng.permutation(n)]
        taken.append(perm[:k])
        rest.append(perm[k:])
    return np.sort(np.concatenate(rest)).astype(np.int64), np.sort(np.concatenate(taken)).astype(np.int64)


def check_stratifiable(labels: np.ndarray, class_names: list[str] | None = None) -> None:
    """A drawn test split needs two samples of every class: one to train on, one to test (downstream only, so that
    pretraining on the same data still runs; the split itself is the same in both modes)."""
    counts = np.bincount(np.asarray(labels, np.int64))
    for c in np.flatnonzero((counts > 0) & (counts < 2)):
        name = class_names[c] if class_names and c < len(class_names) else str(c)
        raise DataError(
            f"class {name!r} (label {c}) has only {counts[c]} labelled sample; a stratified test split needs at "
            "least 2 per class (one to train on, one to test). Add samples of that class or remove it from the "
            "labelled data."
        )


def split_rows(
    pool: np.ndarray, labels: np.ndarray | None, test_fraction: float, val_fraction: float, split_seed: int,
    test: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) rows of ``pool``: the one split that pretraining and downstream runs share.

    ``test`` given (a split tag, folder, key or file) is used as it is. Otherwise the test split is drawn first,
    stratified, when labels are known, and is empty when they are not: a source without labels cannot be used
    downstream, so nothing is held out. Val is val_fraction of what is left. Each draw has its own seeded stream
    (salt 0 test, 1 val, 2 label_fraction), so the test split never depends on val_fraction or label_fraction.
    """
    pool = np.asarray(pool, np.int64)
    if test is not None:
        test = np.asarray(test, np.int64)
    elif labels is not None:
        pool, test = carve(pool, labels, test_fraction, split_seed, 0, need_one=True)
    else:
        test = np.zeros(0, np.int64)
    train, val = carve(pool, labels, val_fraction, split_seed, 1)
    return train, val, test


def label_subset(train_idx: np.ndarray, labels: np.ndarray, label_fraction: float, seed: int) -> np.ndarray:
    """Seeded stratified subset of the train split: round(label_fraction * n_c) of each class, at least one.

    The per-class order does not depend on ``label_fraction``, so a smaller fraction keeps a subset of a larger one.
    """
    if label_fraction >= 1.0:
        return np.asarray(train_idx, np.int64)
    rng = np.random.default_rng([int(seed), 2])
    kept = [np.zeros(0, np.int64)]
    for _, members in _class_groups(np.asarray(train_idx, np.int64), labels):
        k = max(1, int(round(label_fraction * len(members))))
        kept.append(members[rng.permutation(len(members))[:k]])
    return np.sort(np.concatenate(kept)).astype(np.int64)


def id_lists(groups: dict[str, Any]) -> dict[str, list]:
    """group -> sorted plain-python ids (json-ready): ints for rows, strings for files."""
    return {g: sorted(v.tolist() if isinstance(v, np.ndarray) else list(v)) for g, v in groups.items()}


def target_stats(targets: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and population std per target column (float32 [T]); a constant target gets std 1 so it stays finite."""
    if len(targets) == 0:
        raise DataError("no training samples were available to compute regression-target statistics.")
    t = np.asarray(targets, np.float64)
    mean, std = t.mean(axis=0), t.std(axis=0)
    flat = std < 1e-12
    if flat.any():
        log.warning("targets %s are constant in the train split: their std is set to 1", np.flatnonzero(flat))
    std = np.where(flat, 1.0, std)
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)


class ChannelStats:
    """Per-channel mean and (population) std merged block by block (Chan et al.), so no pass holds the whole data."""

    def __init__(self, channels: int) -> None:
        self.count = 0  # pixels per channel
        self.samples = 0
        self.mean = np.zeros(channels, np.float64)
        self.m2 = np.zeros(channels, np.float64)

    def update(self, block: np.ndarray, channel_axis: int = 1) -> None:
        """Add a block of samples [B, ...] whose channels lie on ``channel_axis``."""
        if block.shape[0] == 0:
            return
        axes = tuple(a for a in range(block.ndim) if a != channel_axis)
        n = block.size // block.shape[channel_axis]
        t = torch.from_numpy(np.ascontiguousarray(block)).float()
        var, mean = (v.double().numpy() for v in torch.var_mean(t, dim=axes, correction=0))  # one pass, no temps
        m2 = var * n
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + np.square(delta) * (self.count * n / total)
        self.count = total
        self.samples += block.shape[0]

    def result(self, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) as float32 tensors, multiplied by ``scale`` (1/255 for uint8 data)."""
        if self.count == 0:
            raise DataError("no training samples were available to compute normalisation statistics.")
        std = np.sqrt(self.m2 / self.count)
        flat = std * scale < 1e-12
        if flat.any():
            log.warning("channels %s are constant in the training data: their std is set to 1", np.flatnonzero(flat))
        std = np.where(flat, 1.0 / scale, std)
        return (torch.tensor(self.mean * scale, dtype=torch.float32), torch.tensor(std * scale, dtype=torch.float32))


class BaseDataModule(L.LightningDataModule):
    """Common loaders, attributes and summary; subclasses implement ``_setup`` to fill them once.

    After ``setup`` a subclass must have set: train_set, val_set, image_shape, num_classes, class_names,
    target_names, mean, std; in labelled (downstream) mode also test_set (and target_mean/target_std when the data
    has regression targets).

    Both modes compute one (train, val, test) split of their source, seeded by ``split_seed`` (never by the run's
    ``seed``, which shuffles batches), so a pretraining run and a downstream run on the same data share the test
    split. labelled=False is self-supervised pretraining: it fits on train + val (labels optional) and never reads
    the test split. labelled=True is downstream: labels are required, and it fits on the ``label_fraction`` subset
    of train, selects on val and reports on test. ``split_record()`` lists the ids of every split and of what the
    training loader reads ("fit"), so a later run can check that its test images were never pretrained on.
    """

    def __init__(
        self, name: str, in_chans: int, batch_size: int = 64, num_workers: int = 2, seed: int = 0,
        stats_max_samples: int = 4096, labelled: bool = False, test_fraction: float = 0.2,
        label_fraction: float = 1.0, split_seed: int = 0, bad_samples: str = "error", max_bad_samples: int = 100,
    ) -> None:
        super().__init__()
        self.bad_samples, self.max_bad_samples = check_bad_samples(bad_samples, max_bad_samples)
        self._skipping: dict[str, SkipBadSamples] = {}  # split -> the wrapper that counts its skipped samples
        if not isinstance(in_chans, int) or in_chans < 1:
            raise ConfigError(f"dataset.in_chans={in_chans!r} must be a positive integer (the data's channel count).")
        # a value typed on the command line may arrive as a string or a float: refused here, not deep in a loader
        if not _is_int(batch_size) or batch_size < 1:
            raise ConfigError(f"dataset.batch_size={batch_size!r} must be a positive integer (e.g. 64).")
        if not _is_int(num_workers) or num_workers < 0:
            raise ConfigError(f"dataset.num_workers={num_workers!r} must be an integer >= 0 (0: read in the main "
                              "process).")
        if not _is_int(stats_max_samples) or stats_max_samples < 1:
            raise ConfigError(f"dataset.stats_max_samples={stats_max_samples!r} must be an integer >= 1.")
        if not _is_int(split_seed):
            raise ConfigError(f"dataset.split_seed={split_seed!r} must be an integer (it fixes the train/val/test "
                              "split; the run's seed only shuffles batches).")
        self.name = name
        self.in_chans = in_chans
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.split_seed = int(split_seed)
        self.stats_max_samples = stats_max_samples
        self.labelled = bool(labelled)
        self.test_fraction, self.label_fraction = check_labelled_fractions(test_fraction, label_fraction)
        self.image_shape: tuple[int, int] | None = None
        self.num_classes: int | None = None
        self.class_names: list[str] | None = None
        self.target_names: list[str] = []
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.target_mean: torch.Tensor | None = None
        self.target_std: torch.Tensor | None = None
        self._split_ids: dict[str, dict[str, list]] | None = None
        self._ready = False

    def setup(self, stage: str | None = None) -> None:
        """Lightning may call this for several stages; the work (I/O, validation, stats) happens once."""
        if not self._ready:
            self._setup()
            self._ready = True

    def _setup(self) -> None:
        raise NotImplementedError

    def _require_setup(self) -> None:
        if not self._ready:
            raise RuntimeError(f"{type(self).__name__}: call prepare_data() and setup() before using the data.")

    def _fit_rows(self, train: np.ndarray, val: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
        """What the training loader reads: train + val when pretraining, the label_fraction subset of train
        downstream (seeded by split_seed too, so every seed of a sweep trains on the same labels)."""
        if self.labelled:
            return label_subset(train, labels, self.label_fraction, self.split_seed)
        return np.union1d(train, val).astype(np.int64)

    def _check_splits(self, where: str, sizes: dict[str, int], total: int, fixes: dict[str, str],
                      dropped: int = 0) -> None:
        """Refuse, in one line naming the split, the data's sample count and the fix, a split this mode needs that
        holds no sample: the train split (what the training loader reads) always, the test split in labelled mode
        (the one score a downstream run reports). An empty val split is allowed: the tasks warn and go on."""
        for split in ("train", "test") if self.labelled else ("train",):
            if sizes.get(split, 0) == 0:
                after = f", {dropped} of them dropped for NaN/Inf by dataset.nan_policy=drop" if dropped else ""
                raise DataError(f"{where}: the {split} split has 0 samples (the data has {total} samples{after}); "
                                f"{fixes[split]}.")

    def _record_splits(self, **splits: dict[str, Any]) -> None:
        """Keep train / val / test / fit as group -> ids for ``split_record`` (see its docstring)."""
        missing = {"train", "val", "test", "fit"} - set(splits)
        if missing:
            raise ValueError(f"_record_splits needs train, val, test and fit; missing {sorted(missing)}")
        self._split_ids = {name: id_lists({g: v for g, v in groups.items() if len(v)}) for name, groups in
                           splits.items()}

    def _split_source(self) -> dict[str, Any]:
        """What identifies the data (kind, absolute path, size): subclasses name their files or folders."""
        return {"kind": type(self).__name__, "name": self.name}

    def _split_settings(self) -> dict[str, Any]:
        """The options besides the fractions and split_seed that decide the split (label and split keys)."""
        return {}

    def split_record(self) -> dict[str, Any]:
        """{"source", "splits", "settings"}: which data this mode reads, the ids of its train / val / test splits
        and of "fit" (exactly what the training loader iterates over), and the options that made them.

        Ids are grouped: HDF5 image key -> row indices, folders "files" -> paths relative to the root, STL-10 part
        -> indices. Written to splits.json by ssl_lab.data.splits.write_splits."""
        self._require_setup()
        if self._split_ids is None:
            raise RuntimeError(f"{type(self).__name__}: setup recorded no split ids; call self._record_splits().")
        settings = {
            "mode": "downstream" if self.labelled else "pretrain", "split_seed": self.split_seed,
            "test_fraction": self.test_fraction, "val_fraction": getattr(self, "val_fraction", None),
            "label_fraction": self.label_fraction, "label_key": None, **self._split_settings(),
        }
        return {"source": self._split_source(), "splits": self._split_ids, "settings": settings}

    def norm_stats(self) -> dict[str, list[float]]:
        self._require_setup()
        return {"mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std]}

    def _drop_last(self, n: int, train: bool) -> bool:
        """Pretraining drops the ragged last batch (contrastive losses want full batches); labelled mode keeps it
        (few labels are precious) unless it would hold one sample, which BatchNorm cannot train on."""
        return train and (not self.labelled or (self.batch_size > 1 and n % self.batch_size == 1))

    def _rank_world(self) -> tuple[int, int]:
        """(global rank, world size) from the attached trainer, else from torch.distributed, else (0, 1)."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """Where a resumed run continues: epoch ``epoch``, after its first ``batches_done`` batches.

        Set before ``Trainer.fit``: Lightning builds the training loader (to count the steps for the schedule) and
        starts its workers before it restores the checkpoint's loop state, and then keeps that loader; built from
        the not-yet-restored state it would replay epoch 0 from its first batch."""
        self._resume = (int(epoch), int(batches_done))

    def _start_epoch(self) -> int:
        """The epoch the first iterator belongs to. Lightning creates it before it calls set_epoch, and worker
        processes draw their first indices at once, so a resumed run must start from the restored epoch here."""
        resume = getattr(self, "_resume", None)
        if resume is not None:
            return resume[0]
        trainer = getattr(self, "trainer", None)
        return int(trainer.current_epoch) if trainer is not None else 0

    def _resume_batches(self) -> int:
        """Batches of the first epoch already trained when the run resumes one saved mid-epoch, else 0."""
        resume = getattr(self, "_resume", None)
        return resume[1] if resume is not None else 0

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        rank, world = self._rank_world()
        sampler = EpochSeededSampler(len(dataset), self.seed, shuffle=train, rank=rank, world=world)
        drop_last = self._drop_last(len(sampler), train)
        epoch = self._start_epoch()
        sampler.set_epoch(epoch)
        done = self._resume_batches() if train else 0
        if 0 < done * self.batch_size < len(sampler):
            sampler.skip(epoch, done * self.batch_size)
            log.info("resuming epoch %d after its first %d batches", epoch, done)
        order = {"seed": self.seed, "samples": len(dataset), "batch_size": self.batch_size, "world": world}
        extra: dict[str, Any] = {}
        # The test split is never read around its bad samples: a score on part of it would pass for the whole.
        if self.bad_samples == "skip" and dataset is not self.test_set:
            split = "train" if train else "val"
            if split not in self._skipping or self._skipping[split].dataset is not dataset:
                self._skipping[split] = SkipBadSamples(dataset, self.max_bad_samples, split)
            dataset = self._skipping[split]
            extra["collate_fn"] = skip_collate
        return PositionedLoader(
            dataset, batch_size=self.batch_size, sampler=sampler, drop_last=drop_last, num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(), persistent_workers=self.num_workers > 0, worker_init_fn=worker_init,
            order=order, **extra,
        )

    def bad_sample_counts(self) -> dict[str, Any]:
        """What dataset.bad_samples did in this process: the policy, and per split how many were skipped."""
        return {"policy": self.bad_samples, "max": self.max_bad_samples,
                "skipped": {k: w.count() for k, w in self._skipping.items()},
                "examples": {k: w.examples() for k, w in self._skipping.items() if w.count()}}

    def train_dataloader(self) -> DataLoader:
        self._require_setup()
        if self.labelled:
            if len(self.train_set) < 2:
                raise DataError(
                    f"dataset {self.name!r}: the labelled train split has {len(self.train_set)} sample(s); training "
                    "needs at least 2. Raise dataset.label_fraction or lower dataset.test_fraction/val_fraction."
                )
            return self._loader(self.train_set, train=True)
        if len(self.train_set) < self.batch_size:
            raise DataError(
                f"dataset {self.name!r}: the train split has {len(self.train_set)} samples, fewer than "
                f"batch_size={self.batch_size}, so drop_last would give no batch; lower dataset.batch_size."
            )
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        self._require_setup()
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        self._require_setup()
        if self.test_set is None:
            raise DataError(
                f"dataset {self.name!r}: there is no test split in pretraining mode; build the data module with "
                "labelled=True (the downstream tasks do) to get one."
            )
        return self._loader(self.test_set, train=False)

    def _set_target_stats(self, train_targets: np.ndarray | None) -> None:
        if train_targets is None or train_targets.shape[1] == 0:
            self.target_mean = self.target_std = None
        else:
            self.target_mean, self.target_std = target_stats(train_targets)

    def summary(self) -> dict[str, Any]:
        """Plain facts for the task to log (json-ready)."""
        self._require_setup()
        out = {
            "name": self.name, "in_chans": self.in_chans, "image_shape": list(self.image_shape),
            "n_train": len(self.train_set), "n_val": len(self.val_set), "num_classes": self.num_classes,
            "target_names": list(self.target_names), "labelled": self.labelled, "split_seed": self.split_seed,
        }
        if self.labelled:
            out.update(
                n_test=len(self.test_set), test_fraction=self.test_fraction, label_fraction=self.label_fraction,
                class_names=list(self.class_names or []),
                target_mean=None if self.target_mean is None else [float(v) for v in self.target_mean],
                target_std=None if self.target_std is None else [float(v) for v in self.target_std],
            )
        return {**out, **self._summary_extra(), **self.norm_stats()}

    def _summary_extra(self) -> dict[str, Any]:
        return {}
