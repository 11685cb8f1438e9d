"""The benchmark harness behind ``python -m benchmarks.run``: scenarios, systems, sweeps, targets, reports."""
