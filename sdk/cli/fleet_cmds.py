"""``edgeship fleet ...``: collect, devices, dead-letters, report, export-feedback.

Thin commands: flags in, one library call, errors out as one line. Other
areas add their sub-commands to the ``fleet`` group here (``rollout``,
``serve``, ``console``). The shared flags (``db_option``, ``broker_option``,
``fleet_option``) and ``broker_or_embedded`` live in :mod:`._common`; they are
re-exported here for callers that imported them from this module.
"""
from __future__ import annotations

import json
import logging
import signal
import threading
import time

import click

from ._common import (
    DEFAULT_DB,
    EdgeshipGroup,
    broker_option,
    broker_or_embedded,
    cli_link_options,
    db_option,
    fleet_option,
)

__all__ = ["fleet", "DEFAULT_DB", "db_option", "broker_option", "fleet_option", "broker_or_embedded"]

@click.group(cls=EdgeshipGroup)
def fleet() -> None:
    """The fleet side: collector, devices, reports, feedback export."""


@fleet.command("collect")
@broker_option
@db_option
@fleet_option
@click.option("--share-group", default=None, help="Use MQTT shared subscriptions ($share/GROUP/...) so several collectors split the stream.")
@click.option("--client-id", default=None, help="MQTT client id (stable: the broker keeps the session while away).")
@click.option("--protocol", "protocol_version", type=click.Choice(["3.1.1", "5"]), default="3.1.1", show_default=True)
@click.option("--duration", type=float, default=None, help="Stop after this many seconds (default: until Ctrl-C).")
@click.option("--quiet", is_flag=True, help="No periodic status line.")
@click.option("--max-future-skew", "future_s", type=click.FloatRange(min=0), default=3600.0, show_default=True,
              help="Refuse messages whose ts is more than this many seconds ahead of the receive time.")
@click.option("--max-age", "past_s", type=click.FloatRange(min=0), default=365 * 86400.0, show_default=True,
              help="Refuse messages (not retained states) older than this many seconds; 0: no limit.")
def collect(broker, db_url, fleet, share_group, client_id, protocol_version, duration, quiet, future_s, past_s) -> None:
    """Subscribe to the fleet's topics and store every valid message in the fleet DB.

    Refused messages are counted and kept in the DB's dead letters (``edgeship fleet dead-letters``).
    """
    from .. import protocol
    from ..fleet.collector import Collector
    from ..fleet.db import FleetDB

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    opts = cli_link_options(broker, protocol=protocol_version)  # bad TLS files: refused before anything opens
    with FleetDB.open(db_url) as db, broker_or_embedded(broker, quiet=quiet) as url:
        col = Collector(db, url, fleet, share_group, client_id=client_id, protocol_version=protocol_version,
                        link_options=opts,
                        skew=protocol.Skew(future_s=future_s, past_s=past_s or None),
                        max_crashes=3)  # then exit non-zero (col.check below): the supervisor restarts us
        with col:
            if not quiet:
                click.echo(f"collecting fleet {fleet!r} from {url} into {db_url}", err=True)
            deadline = None if duration is None else time.monotonic() + duration
            last = time.monotonic()
            while not stop.wait(0.5):
                col.check()  # a collector that gave up stops the process non-zero, never silently
                if deadline is not None and time.monotonic() >= deadline:
                    break
                if not quiet and time.monotonic() - last >= 10:
                    last = time.monotonic()
                    s = col.stats()
                    click.echo(f"stored {s['stored']}  duplicates {s['duplicates']}  rejected {s['rejected']}  "
                               f"connected {s['link']['connected']}", err=True)
            s = col.stats()
        click.echo(json.dumps({k: v for k, v in s.items() if k != "link"}))


@fleet.command("devices")
@db_option
@click.option("--fleet", default=None, help="Only this fleet.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def devices(db_url, fleet, as_json) -> None:
    """Devices: online/offline (retained state + last will), model version, last seen."""
    from ..fleet.db import FleetDB

    with FleetDB.open(db_url) as db:
        rows = db.devices(fleet)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no devices yet (is `edgeship fleet collect` running?)")
        return
    now = time.time()
    head = ("device", "fleet", "status", "model", "version", "last seen")
    table = [(r["device"], r["fleet"], "online" if r["online"] else "offline", r["model_name"] or "-",
              r["model_version"] or "-", f"{_ago(now - r['last_seen'])} ago" if r["last_seen"] else "-") for r in rows]
    widths = [max(len(h), *(len(str(t[i])) for t in table)) for i, h in enumerate(head)]
    for line in (head, tuple("-" * w for w in widths), *table):
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip())


@fleet.command("dead-letters")
@db_option
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True, help="How many, newest first.")
@click.option("--reason", default=None, help="Only this reason (e.g. too_deep, out_of_range, future_ts, spoofed).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (payload as base64).")
def dead_letters(db_url, limit, reason, as_json) -> None:
    """Messages the collector refused: when, why, on which topic, and the start of the payload."""
    import base64

    from ..fleet.db import FleetDB

    with FleetDB.open(db_url) as db:
        counts = db.dead_letter_counts()
        rows = db.dead_letters(limit=limit, reason=reason)
    if as_json:
        click.echo(json.dumps({"counts": counts, "dead_letters": [
            {**r, "payload": base64.b64encode(r["payload"]).decode()} for r in rows]}, indent=2))
        return
    if not counts:
        click.echo("no dead letters: every message received was stored")
        return
    click.echo("refused by reason: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    now = time.time()
    for r in rows:
        click.echo(f"{_ago(now - r['received'])} ago  {r['reason']:<13} {r['topic'][:80]}  {r['size']} B  "
                   f"{' '.join(r['detail'].split())[:160]}")


def _ago(s: float) -> str:
    s = max(0.0, s)
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s / n:.0f}{unit}"
    return f"{s:.0f}s"


@fleet.command("report")
@db_option
@click.option("--since", default=None, help="Start of the period: 24h, 7d, an ISO date, or epoch seconds (default: all).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Write PNG plots, summary.json and report.html here.")
@click.option("--bucket", "bucket_s", type=float, default=None, help="Time bucket in seconds for the plots (default: automatic).")
@click.option("--rollout", "rollout_id", default=None,
              help="Add a rollout's timeline, per-cohort figures and gate decisions (with plots).")
def report(db_url, since, out_dir, bucket_s, rollout_id) -> None:
    """Per model version: inferences, error rate, latency p50/p95 over time, feedback."""
    from ..fleet.db import FleetDB
    from ..fleet.report import build_report, drift_section, parse_since, rollout_section

    sections = [rollout_section(rollout_id)] if rollout_id else []
    sections.append(drift_section())  # drift and confidence per version / group, drifting devices (issue 10)
    with FleetDB.open(db_url) as db:
        rep = build_report(db, since=parse_since(since), out_dir=out_dir, bucket_s=bucket_s, sections=sections)
    click.echo(rep.text())


@fleet.command("export-feedback")
@db_option
@click.option("--out", "out_path", type=click.Path(dir_okay=False), required=True, help="Output .npz file.")
@click.option("--model-version", default=None, help="Only feedback on this model version.")
@click.option("--since", default=None, help="Only feedback since (24h, 7d, ISO date, epoch).")
@click.option("--labels", "labels_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="labels.txt (one class name per line) to map label names to class indices.")
@click.option("--holdout", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.2, show_default=True,
              help="Share of devices whose samples are held out for evaluation (split by device).")
def export_feedback_cmd(db_url, out_path, model_version, since, labels_file, holdout) -> None:
    """Labelled field samples (inputs attached by feedback) as an .npz the convert commands accept.

    Also writes OUT.train.npz / OUT.holdout.npz (split by device) and OUT.json
    (device, model version and time of every sample; what was skipped).
    """
    from pathlib import Path

    from ..fleet.db import FleetDB
    from ..fleet.field import export_field_data
    from ..fleet.report import parse_since

    labels = None
    if labels_file:
        labels = [ln.strip() for ln in Path(labels_file).read_text().splitlines() if ln.strip()]
    with FleetDB.open(db_url) as db:
        res = export_field_data(db, out_path, model_version=model_version, since=parse_since(since), labels=labels,
                                holdout=holdout)
    click.echo(res.summary())


# `edgeship fleet console` and `console init` live in their own module (issue 11).
from .console_cmds import console as _console  # noqa: E402

fleet.add_command(_console)

# `edgeship fleet rollout ...` and `edgeship fleet serve` live in their own module (issue 8).
from .rollout_cmds import rollout as _rollout  # noqa: E402
from .rollout_cmds import serve as _serve  # noqa: E402

fleet.add_command(_rollout)
fleet.add_command(_serve)


@fleet.group("db", cls=EdgeshipGroup)
def db_group() -> None:
    """The fleet DB schema: the same numbered migrations on SQLite and PostgreSQL."""


@db_group.command("status")
@db_option
def db_status(db_url) -> None:
    """Show the schema version and the migrations not yet applied."""
    from ..fleet.db import FleetDB

    with FleetDB.open(db_url, migrate=False) as db:
        pending = db.pending_migrations()
        click.echo(f"{db.where} ({db.dialect}): schema version {db.schema_version()}, {len(pending)} pending")
        for version, desc in pending:
            click.echo(f"  pending {version}: {desc}")


@db_group.command("migrate")
@db_option
def db_migrate(db_url) -> None:
    """Apply pending migrations (the fleet commands also do this when they open the DB)."""
    from ..fleet.db import FleetDB

    with FleetDB.open(db_url, migrate=False) as db:
        before = db.schema_version()
        after = db.migrate()
        click.echo(f"{db.where} ({db.dialect}): schema version {before} -> {after}")


@fleet.group("device", cls=EdgeshipGroup)
def device_group() -> None:
    """Per-device broker logins: Mosquitto password file + ACL (docs/secure-broker.md)."""


_passwd_opt = click.option("--passwd-file", type=click.Path(dir_okay=False), required=True,
                           help="Mosquitto password_file to update (created 0600).")
_acl_opt = click.option("--acl-file", type=click.Path(dir_okay=False), required=True,
                        help="Mosquitto acl_file to keep in step (devices write only under their own id).")


@device_group.command("add")
@click.argument("name")
@_passwd_opt
@_acl_opt
@click.option("--role", type=click.Choice(["device", "fleet"]), default="device", show_default=True,
              help="device: its own topics; fleet: the collector/controller login (reads all, writes plans).")
def device_add(name, passwd_file, acl_file, role) -> None:
    """Issue (or re-issue) NAME's login; prints the password once. Reload the broker after."""
    from ..fleet.broker_auth import add_credentials

    password = add_credentials(passwd_file, acl_file, name, role=role)
    click.echo(f"{name} ({role}): password {password}")
    click.echo(f"  only its hash is kept in {passwd_file}; put it in the device's agent.toml [mqtt] password; "
               "then reload the broker (kill -HUP the mosquitto process)", err=True)


@device_group.command("broker-config")
@_passwd_opt
@_acl_opt
@click.option("--cafile", required=True, help="CA certificate (PEM) devices trust.")
@click.option("--certfile", required=True, help="The broker's certificate (PEM).")
@click.option("--keyfile", required=True, help="The broker's private key (PEM).")
@click.option("--port", default=8883, show_default=True, type=int)
@click.option("--persistence-dir", default="/var/lib/mosquitto/", show_default=True)
def broker_config(passwd_file, acl_file, cafile, certfile, keyfile, port, persistence_dir) -> None:
    """Print the mosquitto.conf edgeship expects: TLS, no anonymous, passwords, ACL, persistence."""
    from ..fleet.broker_auth import mosquitto_conf

    click.echo(mosquitto_conf(port=port, cafile=cafile, certfile=certfile, keyfile=keyfile,
                              password_file=passwd_file, acl_file=acl_file, persistence_dir=persistence_dir), nl=False)
