"""`<run_dir>/run.log`: every log record of a run, written only once the run has passed its checks.

Hydra's own file log is opened when the job starts, before any check: a run refused for a bad value left a new
folder holding a run.log, and a second process refused by another's lock appended its lines to the holder's log.
Here the records of a run are held in memory from the moment it takes its directory's lock (and printed on the
console as usual); they go to run.log, followed by everything after, when the run writes its config.yaml. A run
refused before that writes nothing.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import IO

FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"
MAX_HELD = 10_000  # records held before the run starts writing (a bounded amount of start-up chatter)
_ACTIVE: dict[Path, "RunLog"] = {}


class RunLog(logging.Handler):
    def __init__(self, path: Path) -> None:
        super().__init__(level=logging.INFO)
        self.setFormatter(logging.Formatter(FORMAT))
        self.path = Path(path)
        self.held: list[logging.LogRecord] = []
        self.file: IO[str] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.file is None:
            if len(self.held) < MAX_HELD:
                self.held.append(record)
            return
        self.file.write(self.format(record) + "\n")
        self.file.flush()

    def start(self) -> None:
        if self.file is None:
            self.file = open(self.path, "a")
            for record in self.held:
                self.file.write(self.format(record) + "\n")
            self.file.flush()
            self.held.clear()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        super().close()


def attach(run_dir: Path) -> RunLog:
    handler = RunLog(Path(run_dir) / "run.log")
    logging.getLogger().addHandler(handler)
    _ACTIVE[Path(run_dir).absolute()] = handler
    return handler


def detach(handler: RunLog, failure: BaseException | None = None) -> None:
    """Remove the run's handler; a run that had started writing gets its failure as its last line."""
    if failure is not None and handler.file is not None:
        text = " ".join(str(failure).split()) or type(failure).__name__
        handler.emit(logging.makeLogRecord({"name": "ssl_lab", "levelno": logging.ERROR, "levelname": "ERROR",
                                            "msg": text}))
    logging.getLogger().removeHandler(handler)
    _ACTIVE.pop(handler.path.parent.absolute(), None)
    handler.close()


def start_writing(run_dir: Path) -> None:
    """Called when the run writes its first file (its config): from here on its records go to run.log."""
    handler = _ACTIVE.get(Path(run_dir).absolute())
    if handler is not None:
        handler.start()
