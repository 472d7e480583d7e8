"""``MqttLink``: a small wrapper over paho-mqtt 2.x that owns one network thread.

Used by the agent (outbox forwarder, state), the collector and the rollout
controller. What it adds over a bare paho client:

* one thread of its own runs the network loop, connects and reconnects with a
  capped exponential backoff with jitter (:func:`backoff_delay`, pure);
* paho callbacks only record facts (flags, counters) or hand work to a bounded
  queue: nothing is published, subscribed or waited on inside a callback,
  because paho holds its locks there and a publish can deadlock;
* subscriptions are (re)issued by the network thread after every CONNACK, and
  received messages go to one bounded inbound queue (:meth:`get`);
* with ``manual_ack=True`` a received QoS 1 message is acknowledged only when
  the consumer calls :meth:`ack` (the collector acks after its DB commit), so
  a crash between receipt and storage means redelivery, never loss;
* :meth:`publish` returns a :class:`PublishHandle` that completes on PUBACK;
  :meth:`flush` waits (bounded) until every accepted publish is out, and
  :meth:`stop` flushes first, so stopping does not silently drop what
  ``publish()`` accepted (what is still unsent at the deadline is logged and
  counted as ``dropped_at_stop``);
* :meth:`route` gives one topic filter its own bounded queue, so two
  consumers of one link (the rollout client's plans, the outbox forwarder's
  receipts) never read each other's messages;
* health: connected flag, time of the last acknowledged publish, and a
  watchdog: a dead or stalled network thread (paho issues #894 / #704: the
  loop dies quietly while ``publish()`` keeps returning) is noticed by
  :meth:`health` / :meth:`publish`, logged, counted and restarted.

URLs: ``mqtt://[user:pass@]host[:1883]`` or ``mqtts://host[:8883]`` (TLS).
"""
from __future__ import annotations

import logging
import os
import queue
import random
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import ConfigError, TransportError

__all__ = [
    "MqttLink",
    "LinkOptions",
    "PublishHandle",
    "Inbound",
    "Will",
    "backoff_delay",
    "parse_broker_url",
]

log = logging.getLogger("edgeship.mqtt")


# ----------------------------------------------------------------- pure parts

def backoff_delay(attempt: int, *, base: float = 0.5, cap: float = 30.0, factor: float = 2.0,
                  jitter: float = 0.5, rand: float | None = None) -> float:
    """Delay before reconnect attempt ``attempt`` (0 = first retry).

    ``base * factor**attempt`` capped at ``cap``, then reduced by up to
    ``jitter`` (a fraction) so a fleet that lost the same broker does not
    reconnect in lockstep. ``rand`` in [0, 1) makes it deterministic for tests.
    """
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    if not 0 <= jitter <= 1:
        raise ValueError("jitter must be in [0, 1]")
    # Cap the exponent first: factor**attempt overflows a float after ~1000 attempts.
    raw = base * (factor ** min(attempt, 64))
    d = min(cap, raw)
    r = random.random() if rand is None else rand
    return max(0.0, d * (1.0 - jitter * r))


def parse_broker_url(url: str) -> dict[str, Any]:
    """``mqtt://user:pass@host:port`` -> {host, port, tls, username, password}."""
    if "://" not in url:
        url = "mqtt://" + url
    try:
        u = urllib.parse.urlsplit(url)
        port = u.port
    except ValueError as exc:
        raise ConfigError(f"broker URL {url!r} is invalid: {exc}") from exc
    if u.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ConfigError(f"broker URL {url!r}: scheme must be mqtt:// or mqtts://")
    if not u.hostname:
        raise ConfigError(f"broker URL {url!r} has no host; use mqtt://HOST:PORT")
    tls = u.scheme in ("mqtts", "ssl")
    return {
        "host": u.hostname,
        "port": port or (8883 if tls else 1883),
        "tls": tls,
        "username": urllib.parse.unquote(u.username) if u.username else None,
        "password": urllib.parse.unquote(u.password) if u.password else None,
    }


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class LinkOptions:
    """Everything an ``MqttLink`` needs besides the broker URL (config ``[mqtt]``)."""

    client_id: str = ""
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    tls: bool | None = None          # None: from the URL scheme (or True when ca_file is set)
    keepalive: int = 30
    protocol: str = "3.1.1"          # or "5"
    persistent_session: bool = False  # broker keeps subscriptions + queued QoS1 messages while away
    session_expiry_s: int = 7 * 86400  # MQTT 5 only
    will: Will | None = None
    # Called by the network thread before every connect; its Will replaces ``will``.
    # Lets the state reporter stamp each connection's last will with that connection's session.
    will_factory: Callable[[], Will] | None = None
    subscriptions: tuple[tuple[str, int], ...] = ()
    inbound_max: int = 10000
    inbound_block_s: float = 5.0     # manual_ack only: how long a full inbound queue may hold the network thread
    manual_ack: bool = False
    max_inflight: int = 100
    max_queued: int = 10000          # paho's own outgoing queue while disconnected
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    connect_timeout: float = 5.0
    stall_after_s: float = 10.0      # loop heartbeat older than this => stalled

    @classmethod
    def from_files(cls, *, ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None,
                   username: str | None = None, password_file: str | None = None, **other: Any) -> "LinkOptions":
        """Options for a fleet-side link from files named on a command line.

        A file that is missing, or a password file that is empty, is one
        :class:`ConfigError` naming it, before any connection is tried; the
        password is read from its file so it never shows in ``ps``.
        """
        for what, path in (("CA", ca_file), ("client certificate", cert_file), ("client key", key_file),
                           ("password", password_file)):
            if path and not os.path.isfile(path):
                raise ConfigError(f"MQTT {what} file {path!r} does not exist")
        if bool(cert_file) != bool(key_file):
            raise ConfigError("an MQTT client certificate needs both files: certificate and key")
        password = None
        if password_file:
            try:
                with open(password_file, encoding="utf-8") as fh:
                    password = fh.readline().rstrip("\r\n")
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"MQTT password file {password_file!r} cannot be read: {exc}") from exc
            if not password:
                raise ConfigError(f"MQTT password file {password_file!r} is empty; its first line is the password")
            if not username:
                raise ConfigError("an MQTT password file needs a user name too")
        return cls(ca_file=ca_file or None, cert_file=cert_file or None, key_file=key_file or None,
                   username=username or None, password=password, **other)


@dataclass(frozen=True)
class Inbound:
    """One received message. ``mid``/``qos`` matter only with ``manual_ack``."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int
    received: float = field(default_factory=time.time)


class PublishHandle:
    """Completion of one publish: done when the broker acknowledged it (QoS 1 PUBACK)."""

    __slots__ = ("_info", "error")

    def __init__(self, info: Any = None, error: str | None = None) -> None:
        self._info = info
        self.error = error  # set when paho refused the message outright (not queued)

    @property
    def mid(self) -> int | None:
        return None if self._info is None else self._info.mid

    def acked(self) -> bool:
        return self.error is None and self._info is not None and self._published()

    def _published(self) -> bool:
        info = self._info
        # A QoS 1 message published while disconnected keeps rc NO_CONN (and one lost with its
        # connection CONN_LOST) for good: paho resends it on connecting and its PUBACK sets the
        # flag, but is_published() checks rc first and raises "not currently connected".
        if info.rc:
            return bool(info._published)  # noqa: SLF001 - the flag is_published() hides behind rc
        return info.is_published()

    def failed(self) -> bool:
        return self.error is not None

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the PUBACK; True when acknowledged."""
        if self.error is not None or self._info is None:
            return False
        deadline = time.monotonic() + timeout
        while not self._published():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            # MQTTMessageInfo has a Condition inside; wait_for_publish raises when
            # the client is disconnected, so poll is_published() with short waits.
            with self._info._condition:  # noqa: SLF001 - paho exposes no other waitable
                self._info._condition.wait(min(left, 0.05))
        return True


def _paho():
    try:
        import paho.mqtt.client as mqtt
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise TransportError("paho-mqtt is not installed; pip install 'edgeship[agent]'") from exc
    return mqtt


class MqttLink:
    """One MQTT connection with its own network thread. ``start()`` / ``stop(timeout)``.

    Thread model: the link's thread is the only one that connects, reads the
    socket and subscribes; any thread may :meth:`publish` (paho serialises
    writes internally and wakes the loop); consumers read :meth:`get`.
    """

    def __init__(self, url: str, options: LinkOptions | None = None, **kw: Any) -> None:
        opts = options or LinkOptions()
        if kw:
            opts = LinkOptions(**{**opts.__dict__, **kw})
        self.options = opts
        self.url = url
        self._addr = parse_broker_url(url)
        if opts.protocol not in ("3.1.1", "311", "5", "5.0"):
            raise ConfigError(f"[mqtt] protocol: {opts.protocol!r} is not supported; use 3.1.1 or 5")
        self._v5 = opts.protocol.startswith("5")
        self._inbound: queue.Queue[Inbound] = queue.Queue(maxsize=max(1, opts.inbound_max))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._thread_lock = threading.Lock()
        self._client: Any = None
        # Facts written by paho callbacks (single assignments, read by others).
        self._connected = False
        self._generation = 0          # +1 per successful CONNACK
        self._subscribed_gen = 0
        self._subs_version = self._subscribed_version = 0
        self._refused: str | None = None
        self._last_error: str | None = None
        self._last_ack: float | None = None
        self._beat = time.monotonic()
        self._ack_event = threading.Event()
        self.counters = {"published": 0, "acked": 0, "received": 0, "inbound_dropped": 0,
                         "connects": 0, "disconnects": 0, "thread_restarts": 0, "publish_refused": 0,
                         "dropped_at_stop": 0}
        self._routes: list[tuple[str, queue.Queue[Inbound]]] = []
        self._extra_subs: list[tuple[str, int]] = list(opts.subscriptions)
        self._subs_lock = threading.Lock()

    # ------------------------------------------------------------ lifecycle
    def start(self) -> "MqttLink":
        if self._client is not None:
            return self
        self._client = self._make_client()
        self._stop.clear()
        self._spawn()
        return self

    def stop(self, timeout: float = 5.0, *, flush: bool = True) -> None:
        """Flush (up to half of ``timeout``) what was accepted, then disconnect cleanly.

        ``flush=False`` drops unsent publishes at once (a test simulating a crash).
        """
        if flush and self._client is not None and (not self._connected or not self.flush(timeout / 2)):
            left = self.pending()
            if left:
                # Not silent: an outbox keeps its rows and resends them; other senders lose these.
                self.counters["dropped_at_stop"] += left
                log.warning("MQTT link to %s stopped with %d accepted publishes not acknowledged by the broker",
                            self.url, left)
        self._stop.set()
        t = self._thread
        if t is not None:
            t.join(timeout)
        c = self._client
        if c is not None:
            try:
                c.disconnect()  # sends DISCONNECT: the broker must NOT publish our will
            except Exception:  # noqa: BLE001 - socket may already be gone; stopping anyway
                pass
            try:
                c.loop(timeout=0.05)  # flush the DISCONNECT packet
            except Exception:  # noqa: BLE001
                pass
            try:
                c._sock_close()  # noqa: SLF001 - paho has no public "close socket" without loop
            except Exception:  # noqa: BLE001
                pass
        self._connected = False
        self._client = None
        self._thread = None

    def __enter__(self) -> "MqttLink":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_connected(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._connected and self._subscribed():
                return True
            self._stop.wait(0.02)
        return False

    # ------------------------------------------------------------ state
    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def generation(self) -> int:
        """Increments on every (re)connection: in-flight publishes from an older one may be lost."""
        return self._generation

    @property
    def last_ack(self) -> float | None:
        return self._last_ack

    def health(self) -> dict[str, Any]:
        self._watchdog()
        t = self._thread
        beat_age = time.monotonic() - self._beat
        return {
            "broker": f"{self._addr['host']}:{self._addr['port']}",
            "connected": self._connected,
            "network_thread_alive": bool(t and t.is_alive()),
            "network_thread_stalled": bool(t and t.is_alive() and beat_age > self.options.stall_after_s),
            "last_ack": self._last_ack,
            "last_error": self._last_error,
            "inbound_queued": self._inbound.qsize(),
            **self.counters,
        }

    # ------------------------------------------------------------ publish / receive
    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> PublishHandle:
        """Queue one message; the handle completes on PUBACK (QoS 1) or on send (QoS 0).

        Never blocks on the network. While disconnected paho keeps the message
        (bounded by ``max_queued``) and sends it after reconnecting.
        """
        if self._client is None:
            raise TransportError("MQTT link is not started; call start() first")
        self._watchdog()
        try:
            info = self._client.publish(topic, payload, qos=qos, retain=retain)
        except (ValueError, TypeError) as exc:
            raise TransportError(f"cannot publish to {topic!r}: {exc}") from exc
        mqtt = _paho()
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            self.counters["publish_refused"] += 1
            return PublishHandle(info, error=mqtt.error_string(info.rc))
        self.counters["published"] += 1
        return PublishHandle(info)

    def pending(self) -> int:
        """Accepted publishes not yet done (QoS 1: not PUBACKed; QoS 0: not written to the socket)."""
        c = self._client
        if c is None:
            return 0
        # paho keeps QoS>0 messages in _out_messages until their PUBACK and every packet not yet
        # written in _out_packet; it has no public count of either.
        return len(c._out_messages) + len(c._out_packet)  # noqa: SLF001

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s until every accepted publish is done; True if none is left.

        Returns False at once when the link is not started. While disconnected it keeps waiting
        (the link reconnects and paho resends), so a caller bounds it with ``timeout``.
        """
        deadline = time.monotonic() + max(0.0, timeout)
        while self._client is not None and self.pending():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._ack_event.wait(min(left, 0.02))  # set by every PUBACK; QoS 0 needs the short poll
        return self._client is not None

    def route(self, topic_filter: str, qos: int = 1, maxsize: int = 1000) -> "queue.Queue[Inbound]":
        """Subscribe ``topic_filter`` and deliver its messages to a queue of their own (bounded).

        A message matching a route never reaches :meth:`get`. When the route's queue is full the
        message is dropped and counted (``inbound_dropped``): give routes to messages that the
        sender repeats (receipts, retained announcements), not to ones that must not be lost.
        """
        q: queue.Queue[Inbound] = queue.Queue(maxsize=max(1, maxsize))
        with self._subs_lock:
            self._routes.append((topic_filter, q))
        self.subscribe(topic_filter, qos)
        return q

    def wait_ack_activity(self, timeout: float) -> bool:
        """Block up to ``timeout`` for any PUBACK (lets a forwarder sleep without polling)."""
        hit = self._ack_event.wait(timeout)
        self._ack_event.clear()
        return hit

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Add a subscription; issued now if connected and again after every reconnect."""
        with self._subs_lock:
            if (topic_filter, qos) not in self._extra_subs:
                self._extra_subs.append((topic_filter, qos))
                # A version, not "_subscribed_gen = -1": the network thread may be between copying
                # the list and marking it issued, and would mark this subscription issued unsent
                # (seen: a device's rollout-plan subscription lost when the receipt route came in).
                self._subs_version += 1

    def get(self, timeout: float) -> Inbound | None:
        try:
            return self._inbound.get(timeout=timeout)
        except queue.Empty:
            return None

    def get_nowait(self) -> Inbound | None:
        try:
            return self._inbound.get_nowait()
        except queue.Empty:
            return None

    def ack(self, msg: Inbound) -> None:
        """Acknowledge a received QoS 1 message (only with ``manual_ack=True``)."""
        if not self.options.manual_ack or msg.qos == 0 or self._client is None:
            return
        self._client.ack(msg.mid, msg.qos)

    # ------------------------------------------------------------ internals
    def _make_client(self) -> Any:
        mqtt = _paho()
        o = self.options
        proto = mqtt.MQTTv5 if self._v5 else mqtt.MQTTv311
        kwargs: dict[str, Any] = {}
        if not self._v5:
            kwargs["clean_session"] = not o.persistent_session
        if o.persistent_session and not o.client_id:
            raise ConfigError("a persistent MQTT session needs a fixed client id")
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=o.client_id, protocol=proto,
                        reconnect_on_failure=False, manual_ack=o.manual_ack, **kwargs)
        c.max_inflight_messages_set(max(1, o.max_inflight))
        c.max_queued_messages_set(max(0, o.max_queued))
        c.connect_timeout = o.connect_timeout
        user = o.username or self._addr["username"]
        pw = o.password or self._addr["password"]
        if user:
            c.username_pw_set(user, pw)
        tls = o.tls if o.tls is not None else (self._addr["tls"] or bool(o.ca_file))
        if tls:
            import ssl

            try:
                c.tls_set(ca_certs=o.ca_file, certfile=o.cert_file, keyfile=o.key_file,
                          cert_reqs=ssl.CERT_REQUIRED)
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise ConfigError(f"[mqtt] TLS files cannot be used: {exc}") from exc
        elif o.cert_file or o.key_file:
            raise ConfigError("[mqtt] cert_file/key_file need TLS: use an mqtts:// URL or set ca_file")
        if o.will is not None:
            c.will_set(o.will.topic, o.will.payload, qos=o.will.qos, retain=o.will.retain)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        return c

    # paho callbacks: record facts or hand off to the bounded queue; never publish here.
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._refused = str(reason_code)
            self._last_error = f"broker refused the connection: {reason_code}"
            return
        self._refused = None
        self.counters["connects"] += 1
        self._generation += 1
        self._connected = True

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self._connected:
            self.counters["disconnects"] += 1
        self._connected = False
        if self._refused is None and reason_code is not None and getattr(reason_code, "is_failure", False):
            self._last_error = f"disconnected: {reason_code}"

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self.counters["acked"] += 1
        self._last_ack = time.time()
        self._ack_event.set()

    def _on_message(self, client, userdata, msg) -> None:
        self.counters["received"] += 1
        item = Inbound(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain), msg.mid)
        for flt, q in self._routes:
            if _paho().topic_matches_sub(flt, msg.topic):
                try:
                    q.put_nowait(item)
                except queue.Full:
                    self.counters["inbound_dropped"] += 1
                if self.options.manual_ack and msg.qos:
                    client.ack(msg.mid, msg.qos)  # a routed message is never held for a later ack
                return
        try:
            if self.options.manual_ack:
                # Backpressure instead of loss: the consumer acks after it has
                # stored, so pausing the network thread here (bounded, well under
                # the keepalive) just leaves the rest in the broker and the socket.
                self._inbound.put(item, timeout=self.options.inbound_block_s)
            else:
                self._inbound.put_nowait(item)
        except queue.Full:
            self.counters["inbound_dropped"] += 1
            if self.options.manual_ack:
                # The message stays unacknowledged. Each one holds a slot of the
                # broker's in-flight window until the session is resumed, so a few
                # of them would stall delivery for good: reconnect now so the
                # broker redelivers them (disconnect is safe inside a callback;
                # the loop reconnects with backoff).
                client.disconnect()

    def _spawn(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"mqtt-{self.options.client_id or 'link'}",
                                        daemon=True)
        self._beat = time.monotonic()
        self._thread.start()

    def _watchdog(self) -> None:
        """Restart a network thread that died (it should not: its body catches errors)."""
        if self._stop.is_set() or self._client is None:
            return
        t = self._thread
        if t is not None and t.is_alive():
            return
        with self._thread_lock:
            t = self._thread
            if t is not None and t.is_alive() or self._stop.is_set():
                return
            self.counters["thread_restarts"] += 1
            self._connected = False
            log.error("MQTT network thread for %s died (%s); restarting it",
                      self.url, self._last_error or "no error recorded")
            self._spawn()

    def _connect_once(self) -> None:
        mqtt = _paho()
        c = self._client
        o = self.options
        props = None
        clean_start: Any = mqtt.MQTT_CLEAN_START_FIRST_ONLY
        if self._v5:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.CONNECT)
            if o.persistent_session:
                props.SessionExpiryInterval = int(o.session_expiry_s)
                clean_start = False
            else:
                clean_start = True
        self._refused = None
        if o.will_factory is not None:
            w = o.will_factory()
            c.will_set(w.topic, w.payload, qos=w.qos, retain=w.retain)
        c.connect(self._addr["host"], self._addr["port"], keepalive=o.keepalive,
                  clean_start=clean_start, properties=props)

    def _subscribed(self) -> bool:
        """Whether this connection has been sent every subscription of the list as it is now."""
        return self._subscribed_gen == self._generation and self._subscribed_version == self._subs_version

    def _resubscribe(self) -> None:
        with self._subs_lock:
            subs = list(self._extra_subs)
            version = self._subs_version
        gen = self._generation
        if subs:
            rc, _ = self._client.subscribe(subs)
            if rc != _paho().MQTT_ERR_SUCCESS:
                return
        self._subscribed_gen = gen
        self._subscribed_version = version

    def _run(self) -> None:
        mqtt = _paho()
        attempt = 0
        have_socket = False
        while not self._stop.is_set():
            self._beat = time.monotonic()
            try:
                if not have_socket:
                    try:
                        self._connect_once()
                        have_socket = True
                        connect_started = time.monotonic()
                    except (OSError, ValueError) as exc:
                        self._last_error = f"cannot connect to {self._addr['host']}:{self._addr['port']}: {exc}"
                        delay = backoff_delay(attempt, base=self.options.backoff_base, cap=self.options.backoff_cap)
                        attempt += 1
                        self._stop.wait(delay)
                        continue
                rc = self._client.loop(timeout=0.05)
                if self._refused is not None or rc != mqtt.MQTT_ERR_SUCCESS or (
                        not self._connected and time.monotonic() - connect_started > self.options.connect_timeout * 2):
                    # Lost or refused: close and back off before the next attempt.
                    if rc != mqtt.MQTT_ERR_SUCCESS and self._last_error is None:
                        self._last_error = f"network loop: {mqtt.error_string(rc)}"
                    self._connected = False
                    try:
                        self._client._sock_close()  # noqa: SLF001
                    except Exception:  # noqa: BLE001
                        pass
                    have_socket = False
                    delay = backoff_delay(attempt, base=self.options.backoff_base, cap=self.options.backoff_cap)
                    attempt += 1
                    self._stop.wait(delay)
                    continue
                if self._connected:
                    attempt = 0
                    if not self._subscribed():
                        self._resubscribe()
            except Exception as exc:  # noqa: BLE001 - keep the network thread alive, record why
                self._last_error = f"network thread error: {type(exc).__name__}: {exc}"
                log.warning("MQTT %s: %s", self.url, self._last_error)
                self._connected = False
                have_socket = False
                self._stop.wait(backoff_delay(attempt, base=self.options.backoff_base, cap=self.options.backoff_cap))
                attempt += 1
