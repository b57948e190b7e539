"""A bounded cache of answers per (method, path), shared by the meter and guard matchers.

What a request matches depends on its method and path only, so the answer is computed once per
(method, path). Paths with ids make that key space unbounded: the cache keeps `size` answers and drops
the oldest first, one at a time (FIFO: no bookkeeping on a hit, and no cliff where every answer is lost
at once). A hit is one dict lookup: `get` is the underlying dict's own method.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

# Answers kept at most (per matcher).
MATCH_CACHE_SIZE = 10_000
# Longer paths are matched every time instead: real ones are far shorter, and so the cache's memory is
# bounded in bytes too (the head size limit bounds it anyway, but far higher).
MATCH_CACHE_MAX_PATH = 512

Key = tuple[str, str]  # (method, path without its query)
Answer = TypeVar("Answer")


class BoundedMatchCache(Generic[Answer]):
    """Answers per (method, path): at most `size` of them, oldest dropped first; long paths never kept."""

    __slots__ = ("_answers", "get", "size")

    def __init__(self, size: int | None = None) -> None:
        self._answers: OrderedDict[Key, Answer] = OrderedDict()
        # The dict's bound method itself, so a hit costs what a plain dict lookup costs.
        self.get: Callable[[Key], Answer | None] = self._answers.get
        self.size = MATCH_CACHE_SIZE if size is None else size

    def put(self, key: Key, answer: Answer) -> None:
        """Keep `answer` for `key` (not yet cached), unless its path is too long to be worth keeping."""
        if len(key[1]) > MATCH_CACHE_MAX_PATH:
            return
        answers = self._answers
        if len(answers) >= self.size:
            answers.popitem(last=False)
        answers[key] = answer

    def __len__(self) -> int:
        return len(self._answers)
