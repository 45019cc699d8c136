"""specray: disaggregated, confidence-scheduled speculative decoding on Ray.

The subpackages live in the repository's top-level folders (`specray.workers` is `workers/`, ...).
"""

__version__ = "0.1.0"
