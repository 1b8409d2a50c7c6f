"""Log a run of temporary failures once, not once per retry.

While etcd is down every loop of the agent retries with backoff; logging each
attempt would bury the one line that matters. The first failure of a run is a
warning, the following ones are debug, and the recovery is logged with the count.
"""

from __future__ import annotations

import logging


class FailureLog:
    def __init__(self, logger: logging.Logger, what: str) -> None:
        self.logger = logger
        self.what = what
        self.failures = 0

    def failed(self, exc: BaseException) -> None:
        self.failures += 1
        level = logging.WARNING if self.failures == 1 else logging.DEBUG
        self.logger.log(level, "%s failed (will retry quietly): %s", self.what, exc)

    def ok(self) -> None:
        if self.failures:
            self.logger.info("%s works again after %d failed attempts", self.what, self.failures)
            self.failures = 0
