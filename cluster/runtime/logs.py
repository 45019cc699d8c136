"""Logging of the roles' own processes (router, draft workers, verifiers), at the config's level.

The `specray` loggers write problems and notes to stderr and the access log (`specray.access`, one
line per request) to stdout, without timestamps or process names: under `specray serve` Ray
streams both to the console and prefixes each line with the replica that wrote it; elsewhere
(KubeRay) they land in the pod's worker log files, which Ray timestamps.
"""

from __future__ import annotations

import logging
import sys

from specray.cluster.runtime.config import LogLevel


def configure_logging(level: LogLevel) -> None:
    """Set up this process's `specray` loggers; calling it again (a second replica in the same
    worker process) only changes the level."""
    # The process's own streams: Serve replaces sys.stdout and sys.stderr in its replicas with
    # writers into its log files, which Ray does not stream.
    _setup(logging.getLogger("specray"), sys.__stderr__, "%(levelname)s %(name)s: %(message)s", level)
    _setup(logging.getLogger("specray.access"), sys.__stdout__, "%(message)s", level)


def _setup(logger: logging.Logger, stream: object, fmt: str, level: LogLevel) -> None:
    logger.setLevel(level.upper())
    # Not through the root logger, which Ray and Serve configure their own way in each process.
    logger.propagate = False
    if not logger.handlers:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter(fmt))
        logger.addHandler(handler)
