"""`LRU`: a bounded map that drops its least recently used entry first.

The caches read on every request (verified tokens, credit replies) use it instead of
`cachetools.LRUCache`, whose reads run several Python frames (and which keeps two dicts and an
ordered dict per entry). Here a read is `OrderedDict`'s own, in C: `get(key)`, then
`move_to_end(key)` on a hit to mark it used, two C calls. Writes, on the miss path only, evict.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


class LRU(OrderedDict[K, V]):
    def __init__(self, maxsize: int) -> None:
        super().__init__()
        self.maxsize = maxsize

    def __setitem__(self, key: K, value: V) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        if len(self) > self.maxsize:
            self.popitem(last=False)
