"""Skip-and-count of bad data: a broken record becomes a `Skipped` marker that flows down the pipeline
(also out of worker processes) until a `SkipFilter` node drops it, counts it by reason and logs it.

Counting in one node of the main process keeps the counters exact with process workers, and puts
them in the pipeline state, so a resumed run continues the counts of the run it resumes.

A stream that yields nothing usable (a mistyped shard path, a wrong image root: every record skipped) would
otherwise spin forever with cycling on: after `max_consecutive` skips in a row the filter raises
`NoUsableDataError` naming the sources and the most common reason. The same holds for one source of a
mixture whose other sources are fine (its last `max_consecutive` records all skipped): training on without
it would silently change the mixture. Warnings are rate-limited: the first few of each reason, then one per
power of ten with the running count.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, Optional

from torchdata.nodes import BaseNode

logger = logging.getLogger("flamingo_fast.data")

MAX_CONSECUTIVE_SKIPS = 1000  # default: skips in a row before the stream is declared unusable
_LOGGED_PER_REASON = 5  # warnings logged in full per reason before rate limiting


class NoUsableDataError(RuntimeError):
    """Every one of the last `max_consecutive` records was skipped: the data cannot be read as configured."""


@dataclass(frozen=True)
class Skipped:
    """Stands in for a record that was dropped. `reason` is the counter key, `detail` says which and why."""

    reason: str
    detail: str
    source: str = ""


class SkipFilter(BaseNode):
    """Passes items through, dropping `Skipped` markers; `skipped` maps reason -> count. Usable items name
    their source in a `source` attribute (EncodedSample.source), so each source's skips are counted too."""

    SOURCE_KEY = "source"
    SKIPPED_KEY = "skipped"

    def __init__(self, source: BaseNode, max_consecutive: int = MAX_CONSECUTIVE_SKIPS):
        super().__init__()
        if not isinstance(max_consecutive, int) or isinstance(max_consecutive, bool) or max_consecutive < 1:
            raise ValueError(f"max_consecutive must be a positive int, got {max_consecutive!r}")
        self.source = source
        self.max_consecutive = max_consecutive
        self.skipped: dict[str, int] = {}
        self._run: dict[tuple[str, str], int] = {}  # (source, reason) -> skips since the last usable item
        self._source_run: dict[str, dict[str, int]] = {}  # source -> reason -> skips since its last usable item

    def reset(self, initial_state: Optional[Dict[str, Any]] = None):
        super().reset(initial_state)
        self._run, self._source_run = {}, {}
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
                self._run.clear()
                self._source_run.pop(getattr(item, "source", None), None)
                return item
            count = self.skipped[item.reason] = self.skipped.get(item.reason, 0) + 1
            where = f" in source {item.source!r}" if item.source else ""
            if count <= _LOGGED_PER_REASON or _is_power_of_ten(count):
                more = "" if count <= _LOGGED_PER_REASON else f" ({count} skipped for this reason so far)"
                logger.warning("skipped a record%s (%s): %s%s", where, item.reason, item.detail, more)
            key = (item.source, item.reason)
            self._run[key] = self._run.get(key, 0) + 1
            mine = self._source_run.setdefault(item.source, {})
            mine[item.reason] = mine.get(item.reason, 0) + 1
            if sum(self._run.values()) >= self.max_consecutive:
                raise self._unusable(item)
            if sum(mine.values()) >= self.max_consecutive:
                raise self._unusable_source(item, mine)

    def _unusable(self, last: Skipped) -> NoUsableDataError:
        (source, reason), count = max(self._run.items(), key=lambda kv: kv[1])
        sources = sorted({s for s, _ in self._run if s}) or ["(unnamed)"]
        where = f", source {source!r}" if source else ""
        return NoUsableDataError(
            f"the last {sum(self._run.values())} records were all skipped, none usable (sources: "
            f"{', '.join(map(repr, sources))}); most common reason {reason!r} ({count}x{where}), "
            f"e.g. {last.detail}. Check the shard paths / image roots of the data config.")

    def _unusable_source(self, last: Skipped, reasons: dict[str, int]) -> NoUsableDataError:
        reason, count = max(reasons.items(), key=lambda kv: kv[1])
        return NoUsableDataError(
            f"source {last.source or '(unnamed)'!r}: its last {sum(reasons.values())} records were all skipped, "
            f"none usable, while the other sources read fine; most common reason {reason!r} ({count}x), e.g. "
            f"{last.detail}. Check that source's shard paths / image root, or remove it from the mixture.")

    def get_state(self) -> Dict[str, Any]:
        return {self.SOURCE_KEY: self.source.state_dict(), self.SKIPPED_KEY: dict(self.skipped)}


def _is_power_of_ten(n: int) -> bool:
    while n % 10 == 0 and n > 1:
        n //= 10
    return n == 1
