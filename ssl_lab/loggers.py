"""Logger factories that need a decision Lightning's constructors cannot make from config alone."""
from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger

log = logging.getLogger(__name__)


def wandb_credentials() -> str | None:
    """Where W&B would find a login: WANDB_API_KEY, or the netrc entry `wandb login` writes for the W&B host
    (WANDB_BASE_URL's, default api.wandb.ai; the file is $NETRC or ~/.netrc). Only where, never the key."""
    if os.environ.get("WANDB_API_KEY"):
        return "WANDB_API_KEY"
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        entry = netrc.netrc(str(path)).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return None
    return f"{path} ({host})" if entry and entry[2] else None


def wandb_logger(save_dir: str | Path, project: str = "ssl_lab", entity: str | None = None,
                 tags: Sequence[str] = (), run_name: str | None = None) -> WandbLogger:
    """Online when a login exists (WANDB_API_KEY, or `wandb login`'s netrc entry) and WANDB_MODE does not say
    offline; offline otherwise, saying why. wandb reads the key itself, so it never enters the config, the logs or
    the run directory."""
    found = wandb_credentials()
    mode = os.environ.get("WANDB_MODE")
    offline = found is None or mode in ("offline", "disabled")
    if offline:
        why = f"WANDB_MODE={mode}" if mode in ("offline", "disabled") else (
            "no login found (no WANDB_API_KEY, no W&B entry in ~/.netrc): `wandb login` or WANDB_API_KEY to go "
            "online; `wandb sync` uploads an offline run later")
        log.info("logger=wandb: offline (%s)", why)
    else:
        log.info("logger=wandb: online, login from %s", found)
    return WandbLogger(project=project, entity=entity, tags=list(tags), name=run_name, save_dir=str(save_dir),
                       offline=offline)


def start_online(logger: Any) -> None:
    """Start an online W&B run before training, so that a refused login (a wrong or expired WANDB_API_KEY, no
    network) is one line, not a traceback after the first epoch; the key itself never enters the message."""
    if not isinstance(logger, WandbLogger) or logger._offline:
        return
    try:
        logger.experiment  # noqa: B018 - creating it is what logs in
    except Exception as err:  # noqa: BLE001 - wandb raises many kinds (CommError, UsageError, AuthenticationError)
        from ssl_lab.errors import ConfigError

        text = " ".join(str(err).split())[:300]
        key = os.environ.get("WANDB_API_KEY")
        if key:
            text = text.replace(key, "<WANDB_API_KEY>")
        raise ConfigError(f"logger=wandb: W&B did not start the online run ({type(err).__name__}: {text}); check "
                          "the login (WANDB_API_KEY or `wandb login`) and the network, or log offline with "
                          "WANDB_MODE=offline (upload later with `wandb sync`).") from None


def publish(loggers: Sequence[Any], plots: Sequence[Path], metrics: Mapping[str, Any]) -> None:
    """Every logger gets a run's single-number metrics (test/...); those that show media (W&B) also get its plots
    as images and the metrics as a table."""
    from ssl_lab.evaluation.report import scalar_rows

    numbers = {name: float(value) for name, value in scalar_rows(metrics)
               if isinstance(value, (int, float)) and not isinstance(value, bool)}
    for logger in loggers:
        logger.log_metrics({f"result/{name}": value for name, value in numbers.items()})
        logger.save()
        if isinstance(logger, WandbLogger):
            if plots:
                logger.log_image(key="plots", images=[str(p) for p in plots], caption=[Path(p).stem for p in plots])
            logger.log_table(key="metrics", columns=["metric", "value"], data=[[k, v] for k, v in numbers.items()])
