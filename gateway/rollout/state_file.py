"""Where a node keeps its rollouts across restarts: a JSON file written whole
and renamed into place (a crash leaves the old one or the new one, never half)."""
from __future__ import annotations

import logging
import os
import tempfile

import orjson

from gateway.rollout.plan import Book

__all__ = ["state_path", "load_book", "save_book"]

log = logging.getLogger("gateway.rollout")


def state_path(setting: str, config_path: str) -> str:
    """The file: the `rollout_state` setting, else beside the config file; "" (kept in memory) without either."""
    if setting:
        return setting
    return f"{config_path}.rollouts.json" if config_path else ""


def load_book(path: str) -> Book | None:
    """The book kept in `path`; None when there is none (or it cannot be read, which is logged)."""
    if not path:
        return None
    try:
        with open(path, "rb") as fh:
            return Book.from_json(orjson.loads(fh.read()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:  # any wrong shape
        log.error("rollout state not read, starting without it: %s", exc, extra={"file": path})
        return None


def save_book(path: str, book: Book) -> None:
    """Write `book` to `path` (raises OSError when it cannot)."""
    if not path:
        return
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".rollouts-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(orjson.dumps(book.to_json()))
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
