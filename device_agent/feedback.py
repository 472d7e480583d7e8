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
from ..lifecycle import STOP_TIMEOUT_S, Loop

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

    def add_many(self, ids: list[str], labels: list, model: Any, ts: float) -> None:
        """One batch under one lock; records are small tuples turned into dicts on lookup."""
        with self._lock:
            d = self._d
            for pid, lab in zip(ids, labels):
                d[pid] = (lab, model, ts)
            while len(d) > self.size:
                d.popitem(last=False)

    def get(self, prediction_id: str) -> dict | None:
        with self._lock:
            rec = self._d.get(prediction_id)
        if isinstance(rec, tuple):
            return {"label": rec[0], "model": rec[1], "ts": rec[2]}
        return rec

    def __len__(self) -> int:
        return len(self._d)


class _InputWriter(Loop):
    """Writes kept inputs to disk off the inference path: one ``.npz`` per batch, bounded queue, byte cap.

    ``index`` maps a prediction id to (file, row); it is bounded like the
    prediction ring. A batch that finds the queue full is skipped (counted):
    the disk never slows inference down.
    """

    def __init__(self, directory: Path, max_bytes: int, index_size: int = 10000, queue_size: int = 64) -> None:
        super().__init__("feedback-inputs")
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.index_size = max(1, index_size)
        self.q: queue.Queue[tuple[list[str], dict]] = queue.Queue(maxsize=queue_size)
        self.skipped = 0
        self._seq = 0
        self._lock = threading.Lock()
        self._index: OrderedDict[str, tuple[str | None, int]] = OrderedDict()
        # Batches queued but not yet on disk, so feedback arriving right after the prediction finds them.
        self._pending: dict[int, dict] = {}
        # Files from an earlier run count against the cap (oldest deleted first); their index is gone.
        files = sorted(self.dir.glob("*.npz"), key=lambda p: p.stat().st_mtime)
        self._files: OrderedDict[str, int] = OrderedDict((p.name, p.stat().st_size) for p in files)
        self._bytes = sum(self._files.values())

    def offer(self, prediction_ids: list[str], arrays: Mapping[str, Any]) -> None:
        arrays = dict(arrays)
        # Register before queueing: the writer may finish the file before put_nowait returns.
        with self._lock:
            self._seq += 1
            seq = self._seq
            self._pending[seq] = arrays
            for row, pid in enumerate(prediction_ids):
                self._index[pid] = (f"#{seq}", row)
                self._index.move_to_end(pid)
            while len(self._index) > self.index_size:
                self._index.popitem(last=False)
        try:
            self.q.put_nowait((prediction_ids, arrays, seq))
        except queue.Full:
            self.skipped += len(prediction_ids)  # the disk is slower than inference: skip, never wait
            with self._lock:
                self._pending.pop(seq, None)
                for pid in prediction_ids:
                    if self._index.get(pid, ("", 0))[0] == f"#{seq}":
                        del self._index[pid]

    def run(self) -> None:
        import numpy as np

        # Asked to stop, it still writes what is queued (stop's timeout bounds that).
        while not self.stopping or not self.q.empty():
            try:
                pids, arrays, seq = self.q.get(timeout=0.2)
            except queue.Empty:
                continue
            name = f"{int(time.time() * 1000):013d}-{seq:08d}.npz"
            try:
                path = self.dir / name
                tmp = path.with_suffix(".tmp")
                with open(tmp, "wb") as f:
                    np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
                os.replace(tmp, path)  # a crash never leaves a half-written file under the real name
                size = path.stat().st_size
                with self._lock:
                    for pid in pids:
                        ent = self._index.get(pid)
                        if ent is not None and ent[0] == f"#{seq}":
                            self._index[pid] = (name, ent[1])
                    self._files[name] = size
                    self._bytes += size
                    while self._bytes > self.max_bytes and self._files:
                        old, s = self._files.popitem(last=False)
                        self._bytes -= s
                        try:
                            (self.dir / old).unlink()
                        except FileNotFoundError:
                            pass
            except (OSError, ValueError) as exc:
                log.warning("could not keep %d inputs: %s", len(pids), exc)
            finally:
                with self._lock:
                    self._pending.pop(seq, None)

    def load(self, prediction_id: str) -> dict | None:
        """The kept input arrays of one prediction (one sample, no batch axis), or None."""
        import numpy as np

        with self._lock:
            ent = self._index.get(prediction_id)
            if ent is None:
                return None
            where, row = ent
            if where.startswith("#"):
                pending = self._pending.get(int(where[1:]))
                if pending is not None:
                    return {k: np.asarray(v)[row] for k, v in pending.items()}
                return None
        try:
            with np.load(self.dir / where, allow_pickle=False) as z:
                return {k: z[k][row] for k in z.files}
        except (OSError, ValueError, IndexError):
            return None  # deleted by the byte cap


class FeedbackManager:
    """Agent component (``start``/``stop``/``on_result``) and ``feedback(...)`` entry point."""

    def __init__(self, outbox: Any, fleet: str, device: str, *, ring_size: int = 10000,
                 inputs_dir: str | Path | None = None, max_input_bytes: int = 50_000_000) -> None:
        self.outbox = outbox
        self.device = device
        self.topic = protocol.device_topic(fleet, device, "feedback")
        self.ring = PredictionRing(ring_size)
        self.writer = (_InputWriter(Path(inputs_dir), max_input_bytes, index_size=max(1, ring_size))
                       if inputs_dir and max_input_bytes > 0 else None)
        self.input_names: list[str] | None = None  # set by the agent glue; else input0, input1, ...
        self.sent = 0

    def start(self) -> "FeedbackManager":
        if self.writer is not None:
            self.writer.start()  # idempotent: the FleetLink and the input capture both start it
        return self

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        if self.writer is not None:
            self.writer.stop(timeout)

    def on_batch(self, batch: Any) -> None:
        """Agent fast path: remember every prediction of one ResultBatch."""
        if self.ring.size == 0:
            return
        ids = batch.prediction_ids()
        labels = batch.label_names() or [None] * len(ids)
        ts = float(batch.ts) if isinstance(batch.ts, (int, float)) else time.time()
        self.ring.add_many(ids, labels, batch.model, ts)

    def on_batch_inputs(self, batch: Any, inputs: list) -> None:
        """Agent hook (only wired with keep_inputs): hand this batch's input rows to the disk writer."""
        if self.writer is None:
            return
        import numpy as np

        names = self.input_names or [f"input{i}" for i in range(len(inputs))]
        # The agent reuses its buffers for the next batch: copy now, on the batcher thread (cheap memcpy).
        self.writer.offer(batch.prediction_ids(), {n: np.array(a[:batch.n], copy=True) for n, a in zip(names, inputs)})

    def on_result(self, result: Any) -> None:
        pid = getattr(result, "prediction_id", None)
        if not pid:
            return
        self.remember(pid, label=getattr(result, "label", None), model=getattr(result, "model", None),
                      inputs=getattr(result, "inputs", None))

    def remember(self, prediction_id: str, *, label: Any = None, model: Mapping | None = None,
                 inputs: Mapping | None = None) -> None:
        """Record one prediction (SDK users, or results without a batch); ``inputs`` is one sample."""
        self.ring.add(prediction_id, {"label": label, "model": dict(model) if model else None, "ts": time.time()})
        if inputs is not None and self.writer is not None:
            import numpy as np

            if not isinstance(inputs, Mapping):
                inputs = {"input": inputs}
            self.writer.offer([prediction_id], {k: np.asarray(v)[None] for k, v in inputs.items()})

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


def send_feedback(api: str, prediction_id: str, kind: str, value: Any = None, timeout: float = 10.0,
                  token: str | None = None) -> dict:
    """POST one feedback to a running agent's local API (``http://host:port`` or ``unix:/path``;
    ``token``: its ``[api] token``, sent as ``Authorization: Bearer``).

    What ``edgeship agent feedback`` calls. Returns the API's JSON answer;
    a refusal becomes an InputError / TransportError with the agent's message.
    """
    import http.client
    import json
    import socket
    import urllib.parse

    from ..errors import TransportError

    value = check_feedback(kind, value)
    body = json.dumps({"prediction_id": prediction_id, "kind": kind, "value": value}).encode()
    if api.startswith("unix:"):
        path = api[len("unix:"):]

        class _UnixConn(http.client.HTTPConnection):
            def connect(self) -> None:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(timeout)
                self.sock.connect(path)

        conn: http.client.HTTPConnection = _UnixConn("localhost", timeout=timeout)
    else:
        u = urllib.parse.urlsplit(api if "://" in api else f"http://{api}")
        if u.scheme != "http" or not u.hostname:
            raise InputError(f"agent API {api!r} must look like http://127.0.0.1:8765 or unix:/path/to/socket")
        conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
        conn.request("POST", "/v1/feedback", body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
    except OSError as exc:
        raise TransportError(f"cannot reach the agent's local API at {api}: {exc}; is `edgeship agent run` "
                             "running with [api] enabled = true?") from exc
    finally:
        conn.close()
    try:
        out = json.loads(data or b"{}")
    except ValueError:
        out = {"error": data[:200].decode(errors="replace")}
    if resp.status == 400:
        raise InputError(str(out.get("error", out)))
    if resp.status != 200:
        raise TransportError(f"agent API answered {resp.status}: {out.get('error', out)}")
    return out
