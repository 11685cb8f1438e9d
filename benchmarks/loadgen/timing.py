"""The clock every load-generator timestamp uses, and what a client's ``send`` returns."""

from __future__ import annotations

import time
from typing import NamedTuple

# uvloop's loop.time() is libuv's cached millisecond clock, too coarse for latencies.
now = time.perf_counter


class Answer(NamedTuple):
    status: int
    nbytes: int
    # ``now()`` once the request had a connection slot, so the wait for one (client-side queueing) is measured
    # apart from the server's time; a new connection's connect comes after it (the server's accept).
    sent_at: float
