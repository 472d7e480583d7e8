"""``edgeship fleet rollout ...`` and ``edgeship fleet serve``: thin shells over the controller.

``start`` verifies the package, stores the rollout and publishes its signed
plan; without ``--url`` it serves the package itself and keeps running the
controller loop in the foreground until the rollout completes or aborts
(Ctrl-C leaves the rollout in the fleet DB: ``edgeship fleet rollout run``
picks it up). ``run`` is that loop alone (resumes every running rollout).
``pause``/``resume``/``abort``/``promote --force`` change the rollout in the
fleet DB and publish the new plan when ``--broker`` and ``--key`` are given;
otherwise the running controller publishes it within a second.
"""
from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
import time

import click

from ._common import EdgeshipGroup, broker_option, cli_link_options, db_option, embedded_broker_line, fleet_option

__all__ = ["rollout", "serve"]


def _key_option(required: bool = False):
    return click.option("--key", "key_path", type=click.Path(exists=True, dir_okay=False), required=required,
                        envvar="EDGESHIP_ROLLOUT_KEY",
                        help="Ed25519 private key that signs plans (devices must trust its .pub).")


def _who() -> str:
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


@contextlib.contextmanager
def _controller(db_url, broker, fleet, key_path, *, loop: bool = False, serve_host="127.0.0.1", serve_port=0,
                collect: bool = False, quiet: bool = False):
    from ..fleet.stack import FleetStack

    def said(url: str) -> None:
        if not quiet:
            click.echo(embedded_broker_line(url), err=True)

    # A looping controller without --broker gets an embedded broker; one command without one only stores.
    with FleetStack(db_url, broker_url=broker, fleet=fleet, embedded_broker=loop, on_embedded=said,
                    collect=collect, controller="loop" if loop else "link", signing_key=key_path,
                    serve_host=serve_host, serve_port=serve_port, link_options=cli_link_options(broker)) as stack:
        yield stack.controller


def _print_status(st: dict, as_json: bool) -> None:
    from ..fleet.figures import gate_value

    if as_json:
        click.echo(json.dumps(st, indent=2, default=str))
        return
    pkg = st["package"]
    stages = " → ".join(f"{'[' if i == st['stage_index'] else ''}{s['percent']:g}%{']' if i == st['stage_index'] else ''}"
                        for i, s in enumerate(st["stages"]))
    click.echo(f"rollout {st['rollout_id']}: {pkg['name']} {pkg['version']} ({pkg['sha256'][:12]}) to fleet {st['fleet']}")
    click.echo(f"  state {st['state']}   stages {stages}   published {st['percent']:g}%")
    if st.get("soak_left_s") is not None:
        click.echo(f"  soak left {st['soak_left_s']:.0f} s")
    if st.get("reason"):
        click.echo(f"  reason: {st['reason']}")
    per = ", ".join(f"{k} {v}" for k, v in sorted(st["devices_per_state"].items())) or "no devices yet"
    click.echo(f"  devices: {per}")
    f = st["failures"]
    if f["total"] or f["timed_out"]:
        click.echo(f"  failures: {f['total']} failed, {f['timed_out']} timed out  "
                   + ", ".join(f"{k}: {v}" for k, v in f["by_reason"].items()))
    click.echo("  gates:")
    for g in st["gates"]:
        thr = f"+{100 * g['threshold']:.2f}%" if g["unit"] == "rate" else f"x{g['threshold']:g}"
        click.echo(f"    {g['name']:<18} {g['verdict']:<12} canary {gate_value(g, g['canary'])} (n={g['canary_n']})  "
                   f"control {gate_value(g, g['control'])} (n={g['control_n']})  allowed {thr}")
    click.echo(f"  next: {st['decision']['action']} ({st['decision']['reason']})")


@click.group(cls=EdgeshipGroup)
def rollout() -> None:
    """Staged rollouts gated on field quality (canary vs control)."""


@rollout.command("start")
@click.argument("package", type=click.Path(exists=True, dir_okay=False))
@broker_option
@db_option
@fleet_option
@_key_option(required=True)
@click.option("--stages", default="1,10,50,100", show_default=True, help="Cumulative percentages.")
@click.option("--soak", default="30m", show_default=True, help="Soak per stage (30m, 2h, 45s), or one per stage.")
@click.option("--gate", "gates", multiple=True,
              help="NAME:THRESHOLD[:MIN_SAMPLES[:CONFIDENCE[:SLACK]]], e.g. negative_feedback:0.05:100 "
                   "(repeat; default: failures, error_rate, latency_p95, negative_feedback; also drift, "
                   "drift_score, metric:FIELD).")
@click.option("--url", default=None, help="Where devices download the package (default: served by this command).")
@click.option("--id", "rollout_id", default=None, help="Rollout id (default: NAME-VERSION-random).")
@click.option("--max-per-minute", type=int, default=0, show_default=True, help="Devices newly assigned per minute (0 = no limit).")
@click.option("--report-timeout", default="10m", show_default=True, help="A device in an open stage silent this long counts as timed out.")
@click.option("--on-fail", type=click.Choice(["abort", "pause"]), default="abort", show_default=True)
@click.option("--on-insufficient", type=click.Choice(["promote", "wait"]), default="promote", show_default=True,
              help="A gate without enough samples after the soak: let the stage pass, or wait for samples.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to serve the package on (no --url).")
@click.option("--port", type=int, default=0, help="Port to serve the package on (default: any free port).")
@click.option("--collect", is_flag=True, help="Also run a collector in this process.")
@click.option("--detach", is_flag=True, help="Publish and exit (needs --url; a running `rollout run` drives it).")
@click.option("--json", "as_json", is_flag=True)
def start_cmd(package, broker, db_url, fleet, key_path, stages, soak, gates, url, rollout_id, max_per_minute,
              report_timeout, on_fail, on_insufficient, host, port, collect, detach, as_json) -> None:
    """Verify PACKAGE, publish its signed plan and drive the rollout (until done, unless --detach)."""
    from ..errors import RolloutError
    from ..rollout import parse_duration

    if detach and not url:
        raise RolloutError("--detach needs --url: without it this command serves the package and must keep running")
    with _controller(db_url, broker, fleet, key_path, loop=not detach, serve_host=host, serve_port=port,
                     collect=collect, quiet=as_json) as ctl:
        st = ctl.start_rollout(package, stages=stages, soak=soak, gates=list(gates) or None, url=url,
                               rollout_id=rollout_id, max_new_per_min=max_per_minute,
                               report_timeout_s=parse_duration(report_timeout), on_fail=on_fail,
                               on_insufficient=on_insufficient, who=_who())
        _print_status(st, as_json)
        if detach:
            return
        _follow(ctl, st["rollout_id"], as_json)


def _follow(ctl, rollout_id: str | None, as_json: bool) -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    last = None
    while not stop.wait(1.0):
        if rollout_id is None:
            continue
        st = ctl.status(rollout_id)
        line = (st["state"], st["stage_index"], st["percent"])
        if line != last and not as_json:
            click.echo(f"{time.strftime('%H:%M:%S')} {st['state']} stage {st['stage_index'] + 1}/{len(st['stages'])} "
                       f"at {st['percent']:g}%: {st['decision']['reason']}", err=True)
            last = line
        if st["state"] in ("completed", "aborted"):
            _print_status(st, as_json)
            return


@rollout.command("run")
@broker_option
@db_option
@fleet_option
@_key_option(required=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to serve self-served packages on.")
@click.option("--port", type=int, default=0, help="Port to serve self-served packages on.")
@click.option("--collect", is_flag=True, help="Also run a collector in this process.")
def run_cmd(broker, db_url, fleet, key_path, host, port, collect) -> None:
    """Run the controller loop: resume every running rollout of FLEET from the fleet DB, until Ctrl-C."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with _controller(db_url, broker, fleet, key_path, loop=True, serve_host=host, serve_port=port, collect=collect):
        _follow(None, None, False)


@rollout.command("status")
@click.argument("rollout_id")
@db_option
@click.option("--json", "as_json", is_flag=True)
def status_cmd(rollout_id, db_url, as_json) -> None:
    """Stage, devices per state, each gate's figures vs threshold, soak time left."""
    from ..fleet.db import FleetDB

    with FleetDB.open(db_url) as db:
        row = db.rollout_get(rollout_id)
        fleet = row["fleet"] if row else "default"
        from ..fleet.controller import RolloutController

        _print_status(RolloutController(db, None, fleet).status(rollout_id), as_json)


@rollout.command("list")
@db_option
@click.option("--json", "as_json", is_flag=True)
def list_cmd(db_url, as_json) -> None:
    """Every rollout, newest first."""
    from ..fleet.controller import RolloutController
    from ..fleet.db import FleetDB

    with FleetDB.open(db_url) as db:
        rows = RolloutController(db, None, "default").list()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no rollouts")
    for r in rows:
        click.echo(f"{r['rollout_id']:<32} {r['fleet']:<12} {r['package']['name']} {r['package']['version']:<10} "
                   f"{r['state']:<10} stage {r['stage_index'] + 1}/{len(r['stages'])} at {r['percent']:g}%")


def _action(name: str, doc: str):
    @rollout.command(name, help=doc)
    @click.argument("rollout_id")
    @broker_option
    @db_option
    @_key_option()
    @click.option("--reason", default="", help="Recorded in the audit log and the rollout's events.")
    @click.option("--force", is_flag=True, help="promote only: skip the soak time and the gates.")
    def cmd(rollout_id, broker, db_url, key_path, reason, force) -> None:
        from ..fleet.db import FleetDB

        with FleetDB.open(db_url) as db:
            row = db.rollout_get(rollout_id)
        fleet = row["fleet"] if row else "default"
        with _controller(db_url, broker if key_path else None, fleet, key_path) as ctl:
            if name == "promote":
                st = ctl.promote(rollout_id, force=force, who=_who())
            else:
                st = getattr(ctl, name)(rollout_id, who=_who(), reason=reason)
            published = st["published_seq"] >= st["seq"]
        click.echo(f"{rollout_id}: {st['state']}, stage {st['stage_index'] + 1}/{len(st['stages'])} at "
                   f"{st['percent']:g}% ({'published' if published else 'stored; the running controller publishes it'})")
    cmd.__name__ = f"{name}_cmd"
    return cmd


_action("pause", "Stop opening stages (devices already switched stay).")
_action("resume", "Continue a paused rollout.")
_action("abort", "Abort: the plan turns aborted and every switched device rolls back.")
_action("promote", "Open the next stage now (--force; audited).")


@click.command("serve")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8470, show_default=True)
def serve(directory, host, port) -> None:
    """Serve DIRECTORY's .edgepkg files over HTTP (ranged GET, ETag = sha256) until Ctrl-C."""
    from ..fleet.server import PackageServer

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with PackageServer(directory, host=host, port=port) as srv:
        click.echo(f"serving {directory} at {srv.url}/packages/<file> and /packages/sha256/<hex>", err=True)
        while not stop.wait(0.5):
            pass
