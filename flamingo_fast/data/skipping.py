"""Skip-and-count of bad data: a broken record becomes a `Skipped` marker that flows down the pipeline
(also out of worker processes) until a `SkipFilter` node drops it, counts it by reason and logs it.

Counting in one node of the main process keeps the counters exact with process workers, and puts
them in the pipeline state, so a resumed run continues the counts of the run it resumes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, Optional

from torchdata.nodes import BaseNode

logger = logging.getLogger("flamingo_fast.data")


@dataclass(frozen=True)
class Skipped:
    """Stands in for a record that was dropped. `reason` is the counter key, `detail` says which and why."""

    reason: str
    detail: str
    source: str = ""


class SkipFilter(BaseNode):
    """Passes items through, dropping `Skipped` markers; `skipped` maps reason -> count."""

    SOURCE_KEY = "source"
    SKIPPED_KEY = "skipped"

    def __init__(self, source: BaseNode):
        super().__init__()
        self.source = source
        self.skipped: dict[str, int] = {}

    def reset(self, initial_state: Optional[Dict[str, Any]] = None):
        super().reset(initial_state)
        if initial_state is not None:
            self.source.reset(initial_state[self.SOURCE_KEY])
            self.skipped = dict(initial_state[self.SKIPPED_KEY])
        else:
            self.source.reset()
            self.skipped = {}

    def next(self):
        while True:
            item = next(self.source)
            if not isinstance(item, Skipped):
                return item
            self.skipped[item.reason] = self.skipped.get(item.reason, 0) + 1
            where = f" in source {item.source!r}" if item.source else ""
            logger.warning("skipped a record%s (%s): %s", where, item.reason, item.detail)

    def get_state(self) -> Dict[str, Any]:
        return {self.SOURCE_KEY: self.source.state_dict(), self.SKIPPED_KEY: dict(self.skipped)}
