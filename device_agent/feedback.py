"""User feedback on predictions: a bounded ring of recent predictions, optional inputs on disk.

``FeedbackManager`` is an agent component. ``on_result`` remembers each
prediction (id, label, model) in a ring of ``ring_size`` entries; with
``keep_inputs`` the input arrays are handed to a writer thread (bounded
queue, so inference never waits on the disk) that stores them as ``.npy``
files under ``inputs_dir``, capped at ``max_input_bytes`` (oldest deleted).

``feedback(prediction_id, kind, value=None)`` builds a v1 ``feedback``
message — with the model that made the prediction, the predicted label and,
for ``correct`` / ``incorrect`` / ``label``, the captured input when it is
kept and small enough for one MQTT message — and puts it in the outbox.
"""
from __future__ import annotations

import logging
import math
import os
import queue
import re
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

from .. import protocol
from ..errors import InputError

__all__ = ["FeedbackManager", "PredictionRing", "check_feedback", "INPUT_KINDS"]

log = logging.getLogger("edgeship.agent.feedback")

INPUT_KINDS = ("correct", "incorrect", "label")  # feedback that makes a labelled (or hard) sample
# Raw bytes of input we attach to one message: base64 makes it 4/3 larger and the
# v1 payload limit is protocol.MAX_PAYLOAD (256 KiB).
MAX_ATTACH_BYTES = 160 * 1024
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def check_feedback(kind: str, value: Any) -> Any:
    """Validate (kind, value) and return the value to send; InputError says what is wrong."""
    if kind not in protocol.FEEDBACK_KINDS:
        raise InputError(f"feedback kind {kind!r} is not one of {', '.join(protocol.FEEDBACK_KINDS)}")
    if kind in ("correct", "incorrect"):
        if value not in (None, True, False):
            raise InputError(f"feedback {kind!r} takes no value")
        return None
    if kind == "label":
        if value is None or (isinstance(value, str) and not value.strip()):
            raise InputError("feedback 'label' needs the correct label, e.g. --label 7")
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise InputError("feedback 'label' must be a string or an integer")
        return str(value)[:256]
    if kind == "rating":
        try:
            v = float(value)
        except (TypeError, ValueError) as exc:
            raise InputError(f"feedback 'rating' must be a number, got {str(value)[:40]!r}") from exc
        if not math.isfinite(v):
            raise InputError("feedback 'rating' must be a finite number")
        return int(v) if v.is_integer() else v
    if not isinstance(value, str) or not value.strip():
        raise InputError("feedback 'comment' needs a non-empty text")
    return value[:2000]


class PredictionRing:
    """The last ``size`` predictions by id (thread-safe, O(size) memory)."""

    def __init__(self, size: int) -> None:
        self.size = max(0, int(size))
        self._d: OrderedDict[str, dict] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, prediction_id: str, record: dict) -> None:
        if self.size == 0:
            return
        with self._lock:
            self._d[prediction_id] = record
            while len(self._d) > self.size:
                self._d.popitem(last=False)

    def get(self, prediction_id: str) -> dict | None:
        with self._lock:
            return self._d.get(prediction_id)

    def __len__(self) -> int:
        return len(self._d)


class _InputWriter:
    """Writes kept inputs to disk off the inference path; bounded queue and byte cap."""

    def __init__(self, directory: Path, max_bytes: int, queue_size: int = 256) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.q: queue.Queue[tuple[str, dict]] = queue.Queue(maxsize=queue_size)
        self.skipped = 0
        # Inputs queued but not yet on disk, so feedback arriving right after the prediction finds them.
        self._pending: dict[str, dict] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Existing files (oldest first) so the cap holds across restarts.
        files = sorted(self.dir.glob("*.npz"), key=lambda p: p.stat().st_mtime)
        self._files: OrderedDict[str, int] = OrderedDict((p.name, p.stat().st_size) for p in files)
        self._bytes = sum(self._files.values())

    def path_for(self, prediction_id: str) -> Path:
        return self.dir / (_SAFE.sub("_", prediction_id)[:120] + ".npz")

    def offer(self, prediction_id: str, arrays: dict) -> None:
        try:
            self.q.put_nowait((prediction_id, arrays))
            self._pending[prediction_id] = arrays
        except queue.Full:
            self.skipped += 1  # the disk is slower than inference: keep up by skipping, never wait

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="feedback-inputs", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        import numpy as np

        while not self._stop.is_set() or not self.q.empty():
            try:
                pid, arrays = self.q.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                path = self.path_for(pid)
                tmp = path.with_suffix(".tmp")
                with open(tmp, "wb") as f:
                    np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
                os.replace(tmp, path)  # a crash never leaves a half-written input under the real name
                size = path.stat().st_size
                self._files[path.name] = size
                self._files.move_to_end(path.name)
                self._bytes += size
                while self._bytes > self.max_bytes and self._files:
                    name, s = self._files.popitem(last=False)
                    self._bytes -= s
                    try:
                        (self.dir / name).unlink()
                    except FileNotFoundError:
                        pass
            except (OSError, ValueError) as exc:
                log.warning("could not keep input of %s: %s", pid, exc)
            finally:
                self._pending.pop(pid, None)

    def load(self, prediction_id: str) -> dict | None:
        import numpy as np

        pending = self._pending.get(prediction_id)
        if pending is not None:
            return {k: np.asarray(v) for k, v in pending.items()}
        path = self.path_for(prediction_id)
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError):
            return None


class FeedbackManager:
    """Agent component (``start``/``stop``/``on_result``) and ``feedback(...)`` entry point."""

    def __init__(self, outbox: Any, fleet: str, device: str, *, ring_size: int = 10000,
                 inputs_dir: str | Path | None = None, max_input_bytes: int = 50_000_000) -> None:
        self.outbox = outbox
        self.device = device
        self.topic = protocol.device_topic(fleet, device, "feedback")
        self.ring = PredictionRing(ring_size)
        self.writer = _InputWriter(Path(inputs_dir), max_input_bytes) if inputs_dir and max_input_bytes > 0 else None
        self.sent = 0

    def start(self) -> "FeedbackManager":
        if self.writer is not None:
            self.writer.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        if self.writer is not None:
            self.writer.stop(timeout)

    def on_result(self, result: Any) -> None:
        pid = getattr(result, "prediction_id", None)
        if not pid:
            return
        self.ring.add(pid, {"label": getattr(result, "label", None), "model": getattr(result, "model", None),
                            "ts": getattr(result, "ts", None) or time.time()})
        if self.writer is not None:
            inputs = getattr(result, "inputs", None)
            if inputs is None:
                inputs = getattr(result, "input", None)
            if inputs is not None:
                self.writer.offer(pid, inputs if isinstance(inputs, Mapping) else {"input": inputs})

    def remember(self, prediction_id: str, *, label: Any = None, model: Mapping | None = None,
                 inputs: Mapping | None = None) -> None:
        """Record a prediction made outside the agent's result path (e.g. by an SDK user)."""
        self.ring.add(prediction_id, {"label": label, "model": dict(model) if model else None, "ts": time.time()})
        if inputs is not None and self.writer is not None:
            self.writer.offer(prediction_id, dict(inputs))

    def feedback(self, prediction_id: str, kind: str, value: Any = None) -> dict:
        """Queue one feedback message; returns it. InputError for an unknown id or a bad value."""
        if not isinstance(prediction_id, str) or not prediction_id or len(prediction_id) > 128:
            raise InputError("prediction_id must be a non-empty string of at most 128 characters")
        value = check_feedback(kind, value)
        rec = self.ring.get(prediction_id)
        if rec is None:
            raise InputError(f"prediction {prediction_id!r} is not among the last {self.ring.size} predictions "
                             "this agent made; feedback must name a recent prediction_id")
        body: dict[str, Any] = {"prediction_id": prediction_id, "kind": kind, "value": value,
                                "model": rec.get("model"), "predicted": None if rec.get("label") is None
                                else str(rec["label"]), "prediction_ts": rec.get("ts")}
        if kind in INPUT_KINDS and self.writer is not None:
            arrays = self.writer.load(prediction_id)
            if arrays is not None:
                total = sum(a.nbytes for a in arrays.values())
                if total <= MAX_ATTACH_BYTES:
                    body["input"] = {k: protocol.array_field(a.dtype.name, a.shape, a.astype(a.dtype.newbyteorder("<")).tobytes())
                                     for k, a in arrays.items()}
                else:
                    body["input_omitted"] = f"{total} bytes is over the {MAX_ATTACH_BYTES}-byte attach limit"
        msg = protocol.make_message("feedback", self.device, body)
        self.outbox.put("feedback", self.topic, protocol.encode(msg))
        self.sent += 1
        return msg
