"""Benchmarks: the earlier issues' scripts (``bench_router.py``, ``bench_dispatcher.py``), the load generator
(``python -m benchmarks.loadgen``) and the harness that runs scenario sets (``python -m benchmarks.run``)."""
