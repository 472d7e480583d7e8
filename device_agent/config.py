"""Agent configuration: TOML (stdlib ``tomllib``) into frozen dataclasses.

Every section is a frozen dataclass; unknown keys and bad values raise
:class:`~edgeship.errors.ConfigError` whose message names the key, e.g.
``[batcher] max_batch: must be >= 1 (got 0)``. Other components add fields
to their own section's dataclass: a field's type hint drives the type check
and an optional ``metadata={"check": fn}`` returns an error text or None.

``load_config(path)`` reads a file; ``parse_config(mapping, base_dir)`` takes
an already parsed mapping (tests, notebooks). Relative paths (``state_dir``,
``package``, ``trusted_keys``, a source's or sink's ``path``) are resolved
against the config file's folder, so a unit file can start the agent from
anywhere. ``EXAMPLE_CONFIG`` is what ``edgeship agent config --example``
prints; a test parses it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..errors import ConfigError

__all__ = [
    "AgentConfig", "AgentSection", "RuntimeSection", "BatcherSection", "CacheSection", "SourceConfig",
    "SinkConfig", "ApiSection", "MqttSection", "OutboxSection", "TelemetrySection", "FeedbackSection",
    "RolloutSection", "AdaptSection", "load_config", "parse_config", "EXAMPLE_CONFIG", "example_config", "OVERLOAD_POLICIES",
]

OVERLOAD_POLICIES = ("block", "drop_oldest", "reject")


def _positive(v):
    return None if v > 0 else f"must be > 0 (got {v})"


def _at_least(n):
    return lambda v: None if v >= n else f"must be >= {n} (got {v})"


def _one_of(*choices):
    return lambda v: None if v in choices else f"must be one of {', '.join(map(repr, choices))} (got {v!r})"


def _check(fn):
    return field(metadata={"check": fn})


def _opt(default, fn):
    return field(default=default, metadata={"check": fn})


@dataclass(frozen=True)
class AgentSection:
    """[agent] of the agent's TOML config.

    Every section has a docstring: without one, ``dataclass`` computes
    ``inspect.signature`` for it at import, ~1 ms a section (#21 import time).
    """

    device_id: str = field(default_factory=socket.gethostname)
    fleet: str = "default"
    state_dir: str = "edgeship-state"
    package: str | None = None  # installed into the store and activated at start when given
    trusted_keys: list[str] = field(default_factory=list)
    # Without trusted_keys nothing can be verified: packages are refused unless this says, on
    # purpose, that unsigned (and so also tampered) packages may run. Logged loudly; in health.
    allow_unsigned: bool = False
    drain_timeout_s: float = _opt(5.0, _at_least(0))
    log_level: str = _opt("info", _one_of("debug", "info", "warning", "error"))


@dataclass(frozen=True)
class RuntimeSection:
    """[runtime] of the agent's TOML config."""

    backend: str | None = None  # "onnxruntime" | "tflite"; None = what the package's default variant says
    variant: str | None = None
    threads: int | None = None  # intra-op threads; None = the runtime's choice
    optimization: str = "all"
    warmup: int = _opt(3, _at_least(0))


@dataclass(frozen=True)
class BatcherSection:
    """[batcher] of the agent's TOML config."""

    max_batch: int = _opt(32, _at_least(1))
    max_delay_ms: float = _opt(2.0, _at_least(0))
    queue_size: int = _opt(4096, _at_least(1))
    # Bytes in flight (0 = unbounded): samples queued for the model plus the batch's working memory
    # (its inputs and the model's activations per sample, measured when the model loads). The batch
    # gets at most half: max_batch is lowered to fit; the queue holds the rest (at most 4 batches).
    max_bytes_in_flight: int = _opt(32 << 20, _at_least(0))
    overload: str = _opt("block", _one_of(*OVERLOAD_POLICIES))
    block_timeout_ms: float = _opt(1000.0, _at_least(0))
    # Time kept in hand before a deadline when deciding to flush early; the
    # batcher adds its measured run time per batch on top.
    deadline_margin_ms: float = _opt(1.0, _at_least(0))


@dataclass(frozen=True)
class CacheSection:
    """[cache] of the agent's TOML config."""

    enabled: bool = False
    max_entries: int = _opt(4096, _at_least(1))
    ttl_s: float = _opt(60.0, _positive)


@dataclass(frozen=True)
class SourceConfig:
    """one [[sources]] table of the agent's TOML config."""

    type: str = _check(lambda v: None if v else "must name a source type (folder, jsonl, csv, stream, synthetic, camera)")
    id: str = ""
    deadline_ms: float | None = None
    read_ahead: int = _opt(1024, _at_least(1))
    read_ahead_bytes: int = _opt(16 << 20, _at_least(1))  # raw blocks queued ahead (frames, rows)
    workers: int = _opt(0, _at_least(0))      # 0 = auto: 2 for decoding sources (folder, camera), else 1
    block_size: int = _opt(0, _at_least(0))   # 0 = auto: sized from measured bytes and time per sample
    restart: bool = True
    max_restarts: int = _opt(10, _at_least(0))
    # "process": read and parse in a child process (numeric line sources; see procsource.py)
    reader: str = _opt("thread", _one_of("thread", "process"))
    options: dict = field(default_factory=dict)  # every other key, passed to the source


@dataclass(frozen=True)
class SinkConfig:
    """one [[sinks]] table of the agent's TOML config."""

    type: str = _check(_one_of("stdout", "jsonl", "callback", "mqtt"))
    path: str | None = None
    outputs: bool = False  # include raw output tensors in each line
    flush_every: int = _opt(1, _at_least(0))  # flush after this many batches (0 = let the OS decide)
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ApiSection:
    """[api] of the agent's TOML config."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = _opt(8765, _at_least(0))
    unix_socket: str | None = None
    max_body_bytes: int = _opt(16 * 2**20, _at_least(1))
    timeout_s: float = _opt(10.0, _positive)
    # Hardening, see docs/http-api.md (device_agent/api.py reads these).
    token: str | None = None  # clients send "Authorization: Bearer <token>"
    token_file: str | None = None  # or read the token from this file (one line)
    max_connections: int = _opt(32, _at_least(1))  # handler threads; beyond: 503 + Retry-After
    backlog: int = _opt(128, _at_least(1))  # listen queue
    read_timeout_s: float = _opt(10.0, _positive)  # a request must arrive whole within this; idle keep-alive too
    max_batch: int = _opt(256, _at_least(1))  # samples in one request


@dataclass(frozen=True)
class MqttSection:
    """[mqtt] of the agent's TOML config."""

    broker: str | None = field(default=None, metadata={"check": lambda v: None if v is None or str(v).startswith(("mqtt://", "mqtts://")) else f"must look like mqtt://host:port or mqtts://host:port (got {v!r})"})
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    keepalive: int = _opt(30, _positive)
    protocol: str = _opt("3.1.1", _one_of("3.1.1", "5"))


@dataclass(frozen=True)
class OutboxSection:
    """[outbox] of the agent's TOML config."""

    max_bytes: int = _opt(50_000_000, _positive)
    resend_rate: float = _opt(200, _positive)
    receipt_timeout_s: float = _opt(30.0, _positive)


@dataclass(frozen=True)
class TelemetrySection:
    """[telemetry] of the agent's TOML config."""

    window_s: float = _opt(60, _positive)


@dataclass(frozen=True)
class FeedbackSection:
    """[feedback] of the agent's TOML config."""

    ring_size: int = _opt(10000, _at_least(0))
    keep_inputs: bool = False
    max_input_bytes: int = _opt(50_000_000, _at_least(0))


@dataclass(frozen=True)
class RolloutSection:
    """[rollout] of the agent's TOML config."""

    enabled: bool = True
    health_window_s: float = _opt(60, _at_least(0))
    jitter_s: float = _opt(30, _at_least(0))
    bandwidth_limit_kbps: float = _opt(0, _at_least(0))
    server_url: str | None = None
    plan_keys: list[str] = field(default_factory=list)  # keys that sign rollout plans; empty: [agent] trusted_keys


@dataclass(frozen=True)
class AdaptSection:
    """[adapt] of the agent's TOML config."""

    latency_budget_ms: float | None = field(default=None, metadata={"check": lambda v: None if v is None or v > 0 else f"must be > 0 (got {v})"})
    # edgeship.agent.adapt: how the p95 is watched and when the variant changes (hysteresis)
    check_s: float = _opt(1.0, _positive)           # how often the request p95 (+ CPU wait) is checked
    sustain_s: float = _opt(10.0, _at_least(0))     # over budget this long -> step down
    headroom_s: float = _opt(30.0, _at_least(0))    # room for a more accurate variant this long -> step up
    headroom: float = _opt(0.8, _positive)          # ... its expected p95 must fit in this fraction of the budget
    cooldown_s: float | None = None                 # no change this long after one (default: sustain_s)
    min_samples: int = _opt(20, _at_least(1))       # a check with fewer requests is not judged
    probe_ms: float = _opt(10.0, _positive)         # CPU-wait probe: sleep this long, record how late it wakes
    pressure_max: float = _opt(0.2, _positive)      # no step up while tasks waited for a CPU more of the time
    hot_c: float = _opt(80.0, _positive)            # no step up at or above this SoC temperature
    measure_s: float = _opt(1.0, _positive)         # start-up timing per variant
    tune: bool = True                               # measure threads / batch delay when the config leaves them open
    # The variant served without a latency budget (edgeship.agent.adapt_choice): "fastest" measures the
    # package's variants within its accuracy budget at start-up; "default" serves the package's default;
    # "most_accurate" the most accurate variant. [runtime] variant, when set, wins over all three.
    choose: str = _opt("fastest", _one_of("fastest", "default", "most_accurate"))
    choose_s: float = _opt(1.0, _positive)          # start-up timing of the variants, in total (>= 3 rounds)
    choose_margin: float = _opt(0.1, _at_least(0))  # another variant must be this much faster than the default
    # Accuracy points below fp32 a variant may lose and still be served for its speed; None: the package's budget.
    max_drop: float | None = field(default=None, metadata={"check": lambda v: None if v is None or v >= 0 else f"must be >= 0 (got {v})"})


@dataclass(frozen=True)
class AgentConfig:
    """The whole agent config: one attribute per section."""

    agent: AgentSection = field(default_factory=AgentSection)
    runtime: RuntimeSection = field(default_factory=RuntimeSection)
    batcher: BatcherSection = field(default_factory=BatcherSection)
    cache: CacheSection = field(default_factory=CacheSection)
    sources: tuple[SourceConfig, ...] = ()
    sinks: tuple[SinkConfig, ...] = ()
    api: ApiSection = field(default_factory=ApiSection)
    mqtt: MqttSection = field(default_factory=MqttSection)
    outbox: OutboxSection = field(default_factory=OutboxSection)
    telemetry: TelemetrySection = field(default_factory=TelemetrySection)
    feedback: FeedbackSection = field(default_factory=FeedbackSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    adapt: AdaptSection = field(default_factory=AdaptSection)
    source_path: str | None = None  # the TOML file this came from

    def replace(self, **sections: Any) -> "AgentConfig":
        """A copy with whole sections or section fields replaced: ``cfg.replace(batcher={"max_batch": 8})``."""
        updates = {}
        for name, value in sections.items():
            current = getattr(self, name)
            if isinstance(value, Mapping) and dataclasses.is_dataclass(current):
                value = _build(type(current), {**_asdict_shallow(current), **value}, name)
            updates[name] = value
        return dataclasses.replace(self, **updates)


_SECTIONS = {
    "agent": AgentSection, "runtime": RuntimeSection, "batcher": BatcherSection, "cache": CacheSection,
    "api": ApiSection, "mqtt": MqttSection, "outbox": OutboxSection, "telemetry": TelemetrySection,
    "feedback": FeedbackSection, "rollout": RolloutSection, "adapt": AdaptSection,
}


def _asdict_shallow(obj) -> dict:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (inner,) = typing.get_args(hint) or (Any,)
        return isinstance(value, list) and all(_type_ok(v, inner) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "absent"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", dict: "a table"}.get(hint, str(hint))


def _build(cls, data: Mapping, section: str, *, extra_to_options: bool = False):
    if not isinstance(data, Mapping):
        raise ConfigError(f"[{section}]: must be a table")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    options: dict[str, Any] = dict(data.get("options", {})) if extra_to_options else {}
    for key, value in data.items():
        if key not in names or (extra_to_options and key == "options"):
            if extra_to_options and key != "options":
                options[key] = value
                continue
            if key == "options":
                continue
            known = ", ".join(sorted(names))
            raise ConfigError(f"[{section}] {key}: unknown key (known keys: {known})")
        hint = hints[key]
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not _type_ok(value, hint):
            raise ConfigError(f"[{section}] {key}: must be {_type_name(hint)} (got {value!r})")
        kwargs[key] = value
    if extra_to_options:
        kwargs["options"] = options
    for f in dataclasses.fields(cls):
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"[{section}] {f.name}: required key is missing")
    obj = cls(**kwargs)
    for f in dataclasses.fields(cls):
        check = f.metadata.get("check")
        if check is not None:
            msg = check(getattr(obj, f.name))
            if msg:
                raise ConfigError(f"[{section}] {f.name}: {msg}")
    return obj


def _resolve(base: Path | None, p: str | None) -> str | None:
    if p is None or base is None or p in ("-",):
        return p
    path = Path(os.path.expanduser(p))
    return str(path if path.is_absolute() else (base / path))


def _tables(data: dict, key: str, cls: type) -> list:
    """``[[key]]`` entries built as ``cls`` (unknown keys become its options)."""
    raw = data.get(key, [])
    if not isinstance(raw, list):
        raise ConfigError(f"[[{key}]]: must be an array of tables ([[{key}]])")
    return [_build(cls, s, f"{key}.{i}", extra_to_options=True) for i, s in enumerate(raw)]


def parse_config(data: Mapping[str, Any], base_dir: str | os.PathLike | None = None,
                 source_path: str | None = None) -> AgentConfig:
    """Validate a parsed TOML mapping into an :class:`AgentConfig`."""
    base = Path(base_dir) if base_dir is not None else None
    known = set(_SECTIONS) | {"sources", "sinks"}
    for key in data:
        if key not in known:
            raise ConfigError(f"[{key}]: unknown section (known: {', '.join(sorted(known))})")
    sections = {name: _build(cls, data.get(name, {}), name) for name, cls in _SECTIONS.items()}
    a = sections["agent"]
    sections["agent"] = dataclasses.replace(
        a, state_dir=_resolve(base, a.state_dir), package=_resolve(base, a.package),
        trusted_keys=[_resolve(base, k) for k in a.trusted_keys])
    r = sections["rollout"]
    sections["rollout"] = dataclasses.replace(r, plan_keys=[_resolve(base, k) for k in r.plan_keys])
    sources = []
    for i, src in enumerate(_tables(data, "sources", SourceConfig)):
        opts = dict(src.options)
        if isinstance(opts.get("path"), str):
            opts["path"] = _resolve(base, opts["path"])
        sources.append(dataclasses.replace(src, id=src.id or f"{src.type}{i}", options=opts))
    ids = [s.id for s in sources]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise ConfigError(f"[[sources]] id: {sorted(dup)[0]!r} is used twice; give each source its own id")
    sinks = []
    for i, sink in enumerate(_tables(data, "sinks", SinkConfig)):
        if sink.type == "jsonl" and not sink.path:
            raise ConfigError(f"[sinks.{i}] path: a jsonl sink needs path = \"results.jsonl\" (or type = \"stdout\")")
        sinks.append(dataclasses.replace(sink, path=_resolve(base, sink.path)))
    return AgentConfig(**sections, sources=tuple(sources), sinks=tuple(sinks), source_path=source_path)


def load_config(path: str | os.PathLike) -> AgentConfig:
    """Read and validate an agent TOML file."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {p} not found (write one with: edgeship agent config --example > {p.name})") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror or exc}") from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from exc
    return parse_config(data, base_dir=p.resolve().parent, source_path=str(p))


EXAMPLE_CONFIG = '''\
# edgeship agent configuration (TOML). Relative paths are relative to this file.
# Check it with: edgeship agent run --config agent.toml --check

[agent]
device_id = "pi-kitchen-01"       # unique in the fleet; defaults to the host name
fleet = "default"
state_dir = "/var/lib/edgeship"   # store/, state.json, outbox.sqlite live here
# package = "digits-1.0.0.edgepkg"  # installed + activated at start if not active yet
trusted_keys = []                 # e.g. ["/etc/edgeship/fleet.pub"]; packages must be signed by one of them
# allow_unsigned = true           # with no trusted_keys: run unsigned packages (tampered ones too); lab only
drain_timeout_s = 5.0             # on SIGTERM, answer in-flight requests for at most this long

[runtime]
# backend = "onnxruntime"         # or "tflite"; default: the package's default variant
# threads = 2                     # intra-op threads; default: the runtime's choice
warmup = 3                        # runs of the package's example input before serving

[batcher]
max_batch = 32                    # samples per model call
max_delay_ms = 2.0                # wait at most this long to fill a batch
queue_size = 4096                 # pending samples across all sources and the API
max_bytes_in_flight = 33554432    # queued samples + the batch's working memory (max_batch is lowered to fit)
overload = "block"                # block | drop_oldest | reject (every drop is counted)
block_timeout_ms = 1000           # "block": how long a producer may wait before it is rejected

[cache]
enabled = false                   # LRU of results keyed by a hash of the preprocessed input
max_entries = 4096
ttl_s = 60

# Sources: folder, jsonl, csv, stream, synthetic, camera (plugins: entry point group edgeship.sources)
[[sources]]
type = "jsonl"                    # one JSON array (or {"x": [...]}) per line
id = "imu"
path = "/run/sensors/imu.jsonl"   # a file, a FIFO, or "-" for stdin
follow = false                    # keep reading as the file grows
deadline_ms = 50                  # optional per-sample deadline
read_ahead = 1024                 # samples read and preprocessed ahead of the batcher
# read_ahead_bytes = 16777216     # and at most this many bytes of raw blocks (frames, rows)
# block_size = 0                  # samples per block; 0 = auto (small for images, 256 for sensor rows)
# reader = "process"              # parse in a child process: frees the agent's GIL for fast
                                  # streams on a multi-core board (costs ~30 MB and one process)

# [[sources]]
# type = "folder"
# id = "cam"
# path = "/data/incoming"         # a folder or a glob ("/data/*.png"); images or .npy files
# watch = true                    # pick up new files as they arrive
# workers = 0                     # decode/preprocess threads; 0 = auto (2 for folder/camera)

[[sinks]]
type = "jsonl"                    # stdout | jsonl | callback (Python API) | mqtt
path = "results.jsonl"
outputs = false                   # also write raw output tensors

[api]
enabled = true                    # POST /v1/infer, POST /v1/feedback, GET /v1/health, GET /v1/metrics
host = "127.0.0.1"
port = 8765
# unix_socket = "/run/edgeship/agent.sock"
# token_file = "/etc/edgeship/api-token"   # require "Authorization: Bearer <token>" (or token = "...")
max_connections = 32              # concurrent connections (threads); beyond: 503 + Retry-After
read_timeout_s = 10               # a request must arrive whole within this (slow clients get 408)

[mqtt]
# broker = "mqtts://fleet.example.com:8883"
# username = "pi-kitchen-01"
# password = "..."
# ca_file = "/etc/edgeship/ca.pem"
keepalive = 30
protocol = "3.1.1"                # or "5"

[outbox]
max_bytes = 50_000_000            # SQLite outbox bound; oldest telemetry goes first
resend_rate = 200                 # messages/s when the broker comes back
receipt_timeout_s = 30            # resend a row whose collector receipt is this late (doubling, max 600 s)

[telemetry]
window_s = 60

[feedback]
ring_size = 10000                 # recent predictions feedback can refer to
keep_inputs = false               # keep the inputs of predictions that get negative feedback
max_input_bytes = 50_000_000

[rollout]
enabled = true
health_window_s = 60              # keep the previous model in memory this long after a switch
jitter_s = 30
bandwidth_limit_kbps = 0          # 0 = unlimited
plan_keys = []                    # keys that sign rollout plans (fleet.pub); empty = [agent] trusted_keys do both

[adapt]
# latency_budget_ms = 20          # pick the package variant that meets this on this device
# sustain_s = 10                  # p95 over budget this long -> step down to a faster variant
# headroom_s = 30                 # headroom this long -> step back up (not while hot_c is reached)
# pressure_max = 0.2              # no step up while tasks waited for a CPU more of the time (PSI / loadavg)
# tune = true                     # measure [runtime] threads / [batcher] max_delay_ms when not set here
choose = "fastest"                # without a latency budget: time the variants at start-up, serve the fastest
                                  # within the package's accuracy budget ("default": the package's default)
# max_drop = 1.0                  # accuracy points below fp32 a variant may lose; default: the package's budget
'''


def _example_line(text: str, prefix: str, value: str) -> str:
    """``text`` with the one example line starting ``prefix`` set to ``value`` (comment after it kept)."""
    out, found = [], False
    for line in text.splitlines(keepends=True):
        if not found and line.startswith(prefix):
            key = prefix.lstrip("# ").split("=")[0].strip()
            comment = line[line.index("#", len(prefix)):] if "#" in line[len(prefix):] else "\n"
            line = f"{key} = {value}\n" if comment == "\n" else f"{key} = {value}".ljust(33) + " " + comment
            found = True
        out.append(line)
    if not found:  # a programming error: the template and this function disagree
        raise ValueError(f"no line {prefix!r} in EXAMPLE_CONFIG")
    return "".join(out)


def example_config(*, package: str | None = None, state_dir: str | None = None, broker: str | None = None,
                   source: str | None = None, port: int | None = None, trusted_keys: list[str] | None = None) -> str:
    """:data:`EXAMPLE_CONFIG` with the values a first run needs filled in (each ``None`` keeps the example's).

    ``source`` is the path of the example's JSON-lines source (``"-"`` = stdin);
    ``trusted_keys`` the .pub files packages must be signed with (without them the
    agent refuses packages, see ``[agent] allow_unsigned``).
    """
    text = EXAMPLE_CONFIG
    q = json.dumps  # a JSON string is a valid TOML basic string
    if package is not None:
        text = _example_line(text, "# package = ", q(package))
    if state_dir is not None:
        text = _example_line(text, "state_dir = ", q(state_dir))
    if broker is not None:
        text = _example_line(text, "# broker = ", q(broker))
    if source is not None:
        text = _example_line(text, 'path = "/run/sensors/imu.jsonl"', q(source))
    if port is not None:
        text = _example_line(text, "port = ", str(int(port)))
    if trusted_keys:
        text = _example_line(text, "trusted_keys = ", q(list(trusted_keys)))
    return text
