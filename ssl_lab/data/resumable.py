"""Training loaders that Lightning counts as resumable, because they are.

A run stopped mid-epoch continues with exactly the samples it had not trained on: the data module is told the
position before Lightning builds the loader (``BaseDataModule.resume_at``), and its sampler starts the epoch part-way
(``EpochSeededSampler.skip``, ``BlockStream.skip``). Lightning cannot see that and warns that the loader is not
resumable unless it has a ``state_dict`` / ``load_state_dict``. Here the state is what the saved position means (the
order's seed, samples, batch and world size), and a restore checks it: continued with other data settings (a
resume=force), the rest of the epoch is no longer the samples not yet seen, and the run says so.
"""
from __future__ import annotations

import logging
from typing import Any

from torch.utils.data import DataLoader

log = logging.getLogger(__name__)


class PositionedLoader(DataLoader):
    def __init__(self, *args: Any, order: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.order = dict(order)

    def state_dict(self) -> dict[str, Any]:
        return {"order": dict(self.order)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = dict(state.get("order") or {})
        changed = {k: (saved.get(k), v) for k, v in self.order.items() if saved.get(k) != v}
        if saved and changed:
            listed = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
            log.warning("the checkpoint's epoch was cut for another sample order (%s): the rest of this epoch is not "
                        "exactly the samples it had not trained on yet", listed)
