"""The benchmark load generator: closed and open (Poisson) loops, HDR latency histograms, several processes.

Run it as ``python -m benchmarks.loadgen``; the harness (``python -m benchmarks.run``) calls it the same way.
"""
