"""What a first query or scan waits for (the model's load, a tower's export), said when it starts and,
when it ends, how long it took: lines of the `nanodb.loading` logger at INFO, which the command line shows
on stderr, so that a one-shot command is never silent for the tens of seconds a first load can take."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("nanodb.loading")


@contextmanager
def announced(what: str) -> Iterator[None]:
    """`nanodb: WHAT…` now, `nanodb: WHAT: N.N s` once the block is done (nothing more if it raised:
    its error says why)."""
    log.info("nanodb: %s…", what)
    started = time.monotonic()
    yield
    log.info("nanodb: %s: %.1f s", what, time.monotonic() - started)
