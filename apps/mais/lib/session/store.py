"""A bounded, thread-safe store of interaction sessions, keyed per user, image and label.

Bounds (all from `--conf`): an idle time-to-live, a maximum number of sessions and a maximum of bytes held;
the least recently used session goes first. Sessions grow as they open windows, so the bounds are checked
when a session is created and again after each request (`enforce_bounds`). Losing a session is harmless: the
next request replays the full click history it carries.

Lock order: the store lock is held only to look up, insert or evict entries, never while a session computes;
a session's own lock serialises the requests of that one session.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from lib.session.interactive import InteractiveSession

logger = logging.getLogger(__name__)


class SessionKey(NamedTuple):
    """owner: the MONAI Label session or client the clicks come from (`ClickRequest.owner`). image: the image
    file's path. label: the label being segmented."""

    owner: str
    image: str
    label: str


@dataclass
class SessionEntry:
    session: InteractiveSession
    last_used: float  # the store's clock
    lock: threading.Lock = field(default_factory=threading.Lock)


class SessionStore:
    """clock: seconds of a monotonic clock (injectable so that expiry is testable without waiting)."""

    def __init__(self, ttl_s: float, max_sessions: int, max_bytes: int, clock: Callable[[], float] = time.monotonic):
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self.max_bytes = max_bytes
        self.clock = clock
        self._entries: OrderedDict[SessionKey, SessionEntry] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def claim(self, key: SessionKey, create: Callable[[], InteractiveSession]) -> SessionEntry:
        """The entry for `key`, created with `create()` when absent or expired. Lock `entry.lock` to use it."""
        with self._lock:
            self._drop_expired()
            entry = self._entries.get(key)
            if entry is not None:
                entry.last_used = self.clock()
                self._entries.move_to_end(key)
                return entry
        new_entry = SessionEntry(create(), self.clock())  # outside the store lock: loading an image takes a while
        with self._lock:
            entry = self._entries.setdefault(key, new_entry)  # another request may have created it meanwhile
            self._entries.move_to_end(key)
            self._evict_over_bounds(keep=key)
            return entry

    def enforce_bounds(self, keep: SessionKey) -> None:
        """Evict least recently used sessions (never `keep`) until the bounds hold again: call it after a request
        made the session of `keep` grow."""
        with self._lock:
            self._evict_over_bounds(keep=keep)

    def get(self, key: SessionKey) -> SessionEntry | None:
        with self._lock:
            self._drop_expired()
            return self._entries.get(key)

    def drop_where(self, predicate: Callable[[SessionKey], bool]) -> int:
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
        now = self.clock()
        for key in [key for key, entry in self._entries.items() if now - entry.last_used > self.ttl_s]:
            logger.info("session %s expired after %.0f s idle", key, self.ttl_s)
            del self._entries[key]

    def _evict_over_bounds(self, keep: SessionKey) -> None:
        """Evict least recently used sessions (never `keep`) until count and bytes are within bounds."""
        total = sum(entry.session.nbytes for entry in self._entries.values())
        while len(self._entries) > 1 and (len(self._entries) > self.max_sessions or total > self.max_bytes):
            key = next(iter(self._entries))
            if key == keep:
                break
            total -= self._entries.pop(key).session.nbytes
            logger.info("session %s evicted (sessions: %d, bytes: %d)", key, len(self._entries), total)
