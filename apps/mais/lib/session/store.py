"""A bounded, thread-safe store of interaction sessions, keyed per user, image and label.

Bounds (all from `--conf`): an idle time-to-live, a maximum number of sessions and a maximum of bytes held;
the least recently used session goes first. Losing a session is harmless: the next request replays the full
click history it carries.

Lock order: the store lock is held only to look up, insert or evict entries, never while a session computes;
a session's own lock serialises the requests of that one session.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from lib.session.interactive import InteractiveSession

logger = logging.getLogger(__name__)


@dataclass
class SessionEntry:
    session: InteractiveSession
    lock: threading.Lock = field(default_factory=threading.Lock)
    last_used: float = field(default_factory=time.monotonic)


class SessionStore:
    def __init__(self, ttl_s: float, max_sessions: int, max_bytes: int):
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, SessionEntry] = OrderedDict()
        self._lock = threading.Lock()

    def claim(self, key: Hashable, create: Callable[[], InteractiveSession]) -> SessionEntry:
        """The entry for `key`, created with `create()` when absent or expired. Lock `entry.lock` to use it."""
        with self._lock:
            self._drop_expired()
            entry = self._entries.get(key)
            if entry is not None:
                entry.last_used = time.monotonic()
                self._entries.move_to_end(key)
                return entry
        new_entry = SessionEntry(create())  # outside the store lock: loading an image takes a while
        with self._lock:
            entry = self._entries.setdefault(key, new_entry)  # another request may have created it meanwhile
            self._entries.move_to_end(key)
            self._evict_over_bounds(keep=key)
            return entry

    def get(self, key: Hashable) -> SessionEntry | None:
        with self._lock:
            self._drop_expired()
            return self._entries.get(key)

    def drop_where(self, predicate: Callable[[Hashable], bool]) -> int:
        """Drop every session whose key matches (e.g. all sessions of an image whose label was saved)."""
        with self._lock:
            keys = [key for key in self._entries if predicate(key)]
            for key in keys:
                del self._entries[key]
            return len(keys)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def _drop_expired(self) -> None:
        now = time.monotonic()
        for key in [key for key, entry in self._entries.items() if now - entry.last_used > self.ttl_s]:
            logger.info("session %s expired after %.0f s idle", key, self.ttl_s)
            del self._entries[key]

    def _evict_over_bounds(self, keep: Hashable) -> None:
        """Evict least recently used sessions (never `keep`) until count and bytes are within bounds."""
        total = sum(entry.session.nbytes for entry in self._entries.values())
        while len(self._entries) > 1 and (len(self._entries) > self.max_sessions or total > self.max_bytes):
            key = next(iter(self._entries))
            if key == keep:
                break
            total -= self._entries.pop(key).session.nbytes
            logger.info("session %s evicted (sessions: %d, bytes: %d)", key, len(self._entries), total)
