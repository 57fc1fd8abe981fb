"""Display helpers for the notebooks: logging setup, parameter tables and audio players.

The notebooks call these so that their cells hold no logic of their own. Nothing here
runs at import time.
"""

from __future__ import annotations

import logging
import sys

import pandas as pd

from mgutil.storage import Store

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: int | str = logging.INFO) -> None:
    """Send mgutil's log lines to standard error, which papermill's --log-output shows."""
    logger = logging.getLogger("mgutil")
    logger.setLevel(level)
    if not any(getattr(handler, "_mgutil", False) for handler in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler._mgutil = True
        logger.addHandler(handler)
    logger.propagate = False


def parameters_table(parameters: dict) -> pd.DataFrame:
    """Return the effective parameters as a two-column table."""
    return pd.DataFrame(
        {"parameter": list(parameters), "value": [str(value) for value in parameters.values()]}
    )


def audio_players(store: Store, keys: list[str], limit: int) -> list:
    """Return up to ``limit`` inline players for stored WAV files, each with its key as title.

    The WAV bytes are embedded in the notebook, about 64 kB per second of mono audio.
    """
    import html

    from IPython.display import HTML, Audio

    players = []
    for key in keys[: max(limit, 0)]:
        players.append(HTML(f"<b>{html.escape(key)}</b>"))
        players.append(Audio(data=store.get_bytes(key)))
    return players
