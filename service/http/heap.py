"""The garbage collector and a long-running server: what start-up allocated is never garbage, so keep it out of
the collector's sight.

CPython's full (generation 2) collection walks every container object alive. After the router loads, that is about
195,000 objects (torch, the model, every imported module). Serving unique prompts on the 2-core VM, each full
collection then held the event loop for 100-150 ms, about ten a minute; after ``gc.freeze``, 1-7 ms
(``benchmarks/README.md``). ``gc.freeze`` moves every live object into a permanent generation that no collection
visits, as CPython's documentation suggests for pre-fork servers and Instagram did for its Django servers.
"""

from __future__ import annotations

import gc
import logging
import time

logger = logging.getLogger(__name__)


def freeze_startup_heap() -> int:
    """Collect what start-up left as garbage, then exempt every object still alive from later collections. Call it
    once the service has loaded everything it keeps for its lifetime. Returns how many objects were frozen."""
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    elapsed_ms = (time.perf_counter() - started) * 1e3
    logger.info("froze %d start-up objects out of garbage collection in %.0f ms", frozen, elapsed_ms)
    return frozen
