"""A small thread-safe LRU cache: the engine's prompt-embedding and inversion caches, shared by every thread
that runs pipelines on one engine. The lock guards only the dictionary; computing a missing value (a text
encoder or UNet pass) happens outside it, so GPU work never waits on another thread's lookup."""

from __future__ import annotations

import threading
from collections import OrderedDict


class LRUCache:
    """``get``/``put`` with least-recently-used eviction beyond ``size`` entries."""

    def __init__(self, size: int):
        self.size = int(size)
        self._data: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key, default=None):
        with self._lock:
            if key not in self._data:
                return default
            self._data.move_to_end(key)
            return self._data[key]

    def put(self, key, value) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __contains__(self, key) -> bool:
        with self._lock:
            return key in self._data

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    def keys(self) -> list:
        with self._lock:
            return list(self._data)
