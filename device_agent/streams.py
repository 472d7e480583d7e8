"""Per-stream state of a stateful model (issue 20.4): carried between batches, never mixed.

A keyword spotter runs on consecutive windows of each audio stream; the
state it returns for a window is what it must get with the next window of
*that* stream. :class:`StreamStates` keeps one state per stream id (a
``stream`` field of an API request, or a source's id), gathers the rows of a
batch (one per stream: the batch policy never puts two windows of one stream
in one batch) along each state's batch axis, and stores each row's new state
back after the run, before the next batch is taken.

The handle owns it, so a model switch starts every stream afresh (a new
handle has no states; a handle swapped back in is reset). Bounded: past
``max_streams`` the least recently used stream is forgotten (counted in
``evicted``); it then starts over from the initial state.

A caller restarts a stream with its next sample by giving that sample's
stream id as :class:`FreshStream` (``Agent.submit(..., reset=True)``, the
API's ``"reset": true``): the row starts from the initial state and its new
state replaces the stream's. Done at the row, not by forgetting the state
beforehand: a window of the stream still queued would otherwise store its
state after the forgetting, and the "fresh" window would continue from it.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Hashable, Sequence

import numpy as np

if TYPE_CHECKING:
    from ..runtime.state import StatePair

__all__ = ["StreamStates", "FreshStream", "MAX_STREAMS"]

log = logging.getLogger("edgeship.agent")

MAX_STREAMS = 4096  # a GRU state is a few hundred bytes: thousands of streams cost little


class FreshStream(str):
    """A stream id whose sample starts from the initial state (a new utterance on the same microphone).

    A ``str``: equal to and hashed as the plain id, so the batch policy still
    puts at most one row of the stream in a batch and keeps its order.
    """

    __slots__ = ()


class StreamStates:
    """State rows by stream id (LRU-bounded). ``gather``/``scatter`` run on the batch's thread."""

    def __init__(self, pairs: Sequence["StatePair"], specs: Sequence[Any], max_streams: int = MAX_STREAMS) -> None:
        from ..runtime.state import initial_state  # noqa: PLC0415 - stateful models only; keeps the agent import light

        self.pairs = list(pairs)
        # One fresh stream's state per pair (batch 1 on its batch axis); rows are stacked from these.
        self.initial = [initial_state(p, s, 1) for p, s in zip(self.pairs, specs)]
        self.max_streams = max(1, int(max_streams))
        self._rows: OrderedDict[Hashable, list[np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()  # reset() comes from API/switch threads
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._rows)

    def gather(self, streams: Sequence[Hashable | None]) -> list[np.ndarray]:
        """One array per state pair with a row per entry of ``streams`` (None = a fresh state)."""
        with self._lock:
            rows = [self._rows.get(s) if s is not None and not isinstance(s, FreshStream) else None
                    for s in streams]
        return [np.concatenate([r[j] if r is not None else init for r in rows], axis=p.batch_axis)
                for j, (p, init) in enumerate(zip(self.pairs, self.initial))]

    def scatter(self, streams: Sequence[Hashable | None], states: Sequence[np.ndarray]) -> None:
        """Store row ``i`` of each new state as stream ``streams[i]``'s (None rows are not kept)."""
        with self._lock:
            for i, s in enumerate(streams):
                if s is None:
                    continue
                s = str(s)  # a FreshStream is stored as its plain id
                # Copies: a view would keep the whole batch's output alive per stream.
                self._rows[s] = [np.take(a, [i], axis=p.batch_axis).copy() for p, a in zip(self.pairs, states)]
                self._rows.move_to_end(s)
            while len(self._rows) > self.max_streams:
                gone, _ = self._rows.popitem(last=False)
                self.evicted += 1
                if self.evicted == 1 or self.evicted % 1000 == 0:
                    log.warning("stream state of %r forgotten (over %d streams; %d so far): it restarts from the "
                                "initial state", gone, self.max_streams, self.evicted)

    def reset(self, stream: Hashable | None = None) -> bool:
        """Forget one stream's state (True if it had one), or every stream's with None."""
        with self._lock:
            if stream is None:
                had = bool(self._rows)
                self._rows.clear()
                return had
            return self._rows.pop(stream, None) is not None

    def state_of(self, stream: Hashable) -> list[np.ndarray] | None:
        """A copy of one stream's current state rows (tests, debugging)."""
        with self._lock:
            r = self._rows.get(stream)
            return [a.copy() for a in r] if r is not None else None
