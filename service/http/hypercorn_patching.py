"""What the services' Hypercorn patches (``hypercorn_keepalive``, ``hypercorn_single_write``) share: each replaces
private parts of Hypercorn 0.17/0.18 (``pyproject.toml`` holds it below 0.19), once per process, and leaves
Hypercorn's own in place, with a warning, where a release no longer has them."""

from __future__ import annotations

import logging
from collections.abc import Iterable

logger = logging.getLogger(__name__)


def should_patch(cls: type, marker: str, replaced: Iterable[str], patch: str) -> bool:
    """Whether to patch ``cls`` now: not done yet (its ``marker`` attribute unset), and it still has every name the
    patch replaces or calls."""
    if getattr(cls, marker, False):
        return False
    missing = [name for name in replaced if not hasattr(cls, name)]
    if missing:
        logger.warning("this Hypercorn's %s lacks %s, which %s replaces: its own is kept",
                       cls.__name__, ", ".join(missing), patch)  # fmt: skip
        return False
    return True
