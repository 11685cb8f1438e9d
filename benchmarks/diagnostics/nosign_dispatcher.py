"""Diagnostic only: ``serve-dispatcher`` with every signature replaced by a constant, to measure what signing
costs a route in place (compare with ``loop_cpu.sh`` against the real dispatcher). Never deploy this.

    python benchmarks/diagnostics/nosign_dispatcher.py serve-dispatcher --port 9202 --config endpoints.toml
"""

from __future__ import annotations

import sys

from service.cli import main
from service.dispatch import signing

CONSTANT_SIGNATURE = "00" * signing.SIGNATURE_BYTES

if __name__ == "__main__":
    signing.Signer.sign = lambda self, assignment: CONSTANT_SIGNATURE  # type: ignore[method-assign]
    sys.exit(main(sys.argv[1:]))
