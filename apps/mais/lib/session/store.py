"""A bounded, thread-safe store of interaction sessions, matched to requests by their click history.

Clients send the segment's full click history with every request and no interaction id (OHIF sends no client id
either). A request continues a stored session of its image, label and weights (`SessionScope`) whose applied
clicks are a prefix of the request's history (`lib.clicks.history.common_prefix`), whoever sent it, on whichever
replica or after a restart. Among those, the session the same client used last wins, then the longest, then the
most recently used. A request that extends none starts a session of its own and replays its history, in the
order of the longest prefix it shares with a session (so an undo restores exactly the earlier mask, and a user
whose history parted from another's replays the part they shared as both applied it). A session is only ever
continued by a request that carries its whole history, so no id gives access to it, and the mask a request gets
is the one a lone user sending the same requests gets.

The request carries no order between its positive and its negative list: two sessions that applied the same
clicks in different orders look the same to it, and only the client hint (`owner`, which OHIF does not send)
tells them apart.

A session is only ever extended while stored: a request that would drop clicks (undo) or asks for `reset_state`
starts a new session, so a user who had the same history until now still finds the old one. One request at a
time uses a session (`continued` holds its lock); a request that waited for a session another request has just
extended past its own history looks again, and replays its own when nothing fits any more.

Bounds (all from `--conf`): an idle time-to-live, a maximum number of sessions and a maximum of bytes held
(`InteractiveSession.nbytes`: everything a session holds); the least recently used session goes first. Sessions
grow as they open windows, so the bounds are checked when a session is created and again after each request.
Losing a session is harmless: the next request replays the full click history it carries.

Lock order: the store lock is held only to look up, insert or evict entries, never while a session computes or
while waiting for a session's lock.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

from lib.clicks.history import Voxel, common_prefix
from lib.clicks.simulator import POSITIVE, Click
from lib.session.interactive import InteractiveSession

logger = logging.getLogger(__name__)


class SessionScope(NamedTuple):
    """The sessions a request may continue: image, the image file's path; label, the label being segmented;
    weights, the version of the weights that built the session's memory (another's memory means nothing)."""

    image: str
    label: str
    weights: str


@dataclass
class SessionEntry:
    scope: SessionScope
    session: InteractiveSession
    owner: str  # the client of the request that used the session last: a preference, never a key
    last_used: float  # the store's clock
    lock: threading.Lock = field(default_factory=threading.Lock)


class SessionStore:
    """clock: seconds of a monotonic clock (injectable so that expiry is testable without waiting)."""

    def __init__(self, ttl_s: float, max_sessions: int, max_bytes: int, clock: Callable[[], float] = time.monotonic):
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self.max_bytes = max_bytes
        self.clock = clock
        self._entries: OrderedDict[int, SessionEntry] = OrderedDict()  # least recently used first
        self._ids = itertools.count()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes all stored sessions hold together."""
        with self._lock:
            return sum(entry.session.nbytes for entry in self._entries.values())

    @contextmanager
    def continued(
        self,
        scope: SessionScope,
        positives: Sequence[Voxel],
        negatives: Sequence[Voxel],
        owner: str,
        create: Callable[[], InteractiveSession],
        reset: bool = False,
    ) -> Iterator[tuple[InteractiveSession, list[Click]]]:
        """The session this request continues, or a new one made by `create()`, locked for the request; with
        the request's full history in arrival order (the session's applied clicks first), which the caller
        brings it to (`InteractiveSession.advance`). reset: always a new session. The bounds are enforced when
        the request is done."""
        entry_id, entry, history = self._continue(scope, positives, negatives, owner, reset)
        if entry is None:
            entry = SessionEntry(scope, create(), owner, self.clock())  # outside the store lock: it takes a while
            entry.lock.acquire()
            with self._lock:
                entry_id = next(self._ids)
                self._entries[entry_id] = entry
                self._evict_over_bounds(keep=entry_id)
        try:
            yield entry.session, history
        finally:
            entry.lock.release()
            with self._lock:
                self._evict_over_bounds(keep=entry_id)  # the session may have grown (new windows)

    def _continue(
        self, scope: SessionScope, positives: Sequence[Voxel], negatives: Sequence[Voxel], owner: str, reset: bool
    ) -> tuple[int | None, SessionEntry | None, list[Click]]:
        """(id, entry locked for the caller, history) of the session to continue, or (None, None, history) to
        start one. A session extended by another request while this one waited for it is tried no more: stored
        sessions only grow, so it cannot fit again."""
        if reset:
            return None, None, common_prefix([], positives, negatives)[1]
        tried: set[int] = set()
        while True:
            with self._lock:
                self._drop_expired()
                entry_id, continues, history = self._best_match(scope, positives, negatives, owner, tried)
                if not continues:
                    return None, None, history
                entry = self._entries[entry_id]
            entry.lock.acquire()  # a request using it finishes first
            prefix, rest = common_prefix(entry.session.clicks, positives, negatives)
            with self._lock:
                if len(prefix) == len(entry.session.clicks) and self._entries.get(entry_id) is entry:
                    entry.owner, entry.last_used = owner, self.clock()
                    self._entries.move_to_end(entry_id)
                    return entry_id, entry, prefix + rest
            entry.lock.release()
            tried.add(entry_id)

    def _best_match(
        self, scope: SessionScope, positives: Sequence[Voxel], negatives: Sequence[Voxel], owner: str, tried: set
    ) -> tuple[int | None, bool, list[Click]]:
        """(id, whether the request extends it, the request's history in its order) of the stored session of
        `scope` that shares the longest prefix with the request (`common_prefix`); ranked: extended, last used
        by `owner`, prefix length, most recently used. (None, False, positives first) without one."""
        best, best_rank, best_history = None, None, common_prefix([], positives, negatives)[1]
        for recency, (entry_id, entry) in enumerate(self._entries.items()):
            if entry.scope != scope or entry_id in tried:
                continue
            applied = list(entry.session.clicks)  # a copy: another request may be extending it
            prefix, rest = common_prefix(applied, positives, negatives)
            # a session without clicks, e.g. one being created, is not worth waiting for: it saves no step
            extends = len(prefix) == len(applied) and bool(applied or not (positives or negatives))
            rank = (extends, entry.owner == owner, len(prefix), recency)
            if best_rank is None or rank > best_rank:
                best, best_rank, best_history = entry_id, rank, prefix + rest
        return best, best_rank is not None and best_rank[0], best_history

    def positives_applied(self, image: str, label: str, positives: Sequence[Voxel]) -> bool:
        """Whether a stored session of this image and label has applied exactly these positive clicks, in this
        order: OHIF's label-less request is for a label whose list differs from every session's."""
        wanted = [tuple(point) for point in positives]
        with self._lock:
            self._drop_expired()
            return any(
                entry.scope.image == image
                and entry.scope.label == label
                and [c.coord for c in list(entry.session.clicks) if c.label == POSITIVE] == wanted
                for entry in self._entries.values()
            )

    def drop_where(self, predicate: Callable[[SessionScope], bool]) -> int:
        """Drop every session whose scope matches (e.g. all sessions of an image whose label was saved)."""
        with self._lock:
            ids = [entry_id for entry_id, entry in self._entries.items() if predicate(entry.scope)]
            for entry_id in ids:
                del self._entries[entry_id]
            return len(ids)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def _drop_expired(self) -> None:
        now = self.clock()
        for entry_id in [i for i, entry in self._entries.items() if now - entry.last_used > self.ttl_s]:
            logger.info("session %s expired after %.0f s idle", self._entries[entry_id].scope, self.ttl_s)
            del self._entries[entry_id]

    def _evict_over_bounds(self, keep: int) -> None:
        """Evict least recently used sessions (never `keep`) until count and bytes are within bounds."""
        total = sum(entry.session.nbytes for entry in self._entries.values())
        while len(self._entries) > 1 and (len(self._entries) > self.max_sessions or total > self.max_bytes):
            entry_id = next(iter(self._entries))
            if entry_id == keep:  # the least recently used is the request's own: the next one goes
                entry_id = next(itertools.islice(self._entries, 1, None))
            evicted = self._entries.pop(entry_id)
            total -= evicted.session.nbytes
            logger.info("session %s evicted (sessions: %d, bytes: %d)", evicted.scope, len(self._entries), total)
