"""Process plumbing the three services share: run a loop until SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


def run_until_signalled(loop: Callable[[threading.Event], None]) -> None:
    """Run `loop(stop)` and set `stop` on SIGTERM or SIGINT, so an in-flight task can finish."""
    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping after the current message", signum)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    loop(stop)
