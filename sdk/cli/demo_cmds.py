"""``edgeship demo``: the whole loop on this machine (a thin shell over :func:`edgeship.demo.run_demo`)."""
from __future__ import annotations

import logging

import click

__all__ = ["demo"]


@click.command("demo")
@click.option("--fast", is_flag=True, help="A sub-minute run: few devices, tiny training, short soaks.")
@click.option("--keep", is_flag=True, help="Leave the broker, servers and devices running until Ctrl-C.")
@click.option("--broker", "broker_url", default=None, metavar="URL",
              help="Use this MQTT broker (mqtt://host:port) instead of starting an embedded one.")
@click.option("--devices", type=click.IntRange(min=2), default=None,
              help="Number of simulated devices (default 24, or 10 with --fast).")
@click.option("--workdir", type=click.Path(file_okay=False), default="edgeship-demo", show_default=True,
              help="Where the fleet DB, device states, served packages and the report go (replaced each run).")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Where built models are kept and reused (default: $EDGESHIP_CACHE_DIR or ~/.cache/edgeship/demo).")
@click.option("--loop", is_flag=True,
              help="The field loop instead: shift at some devices → drift alarm + corrections → export → retrain "
                   "→ staged rollout → recovery.")
@click.option("--quiet", "-q", is_flag=True, help="No narration and no progress bars.")
@click.option("--verbose", "-v", is_flag=True, help="Also show the parts' own warnings (agents, collector, controller).")
def demo(fast, keep, broker_url, devices, workdir, cache_dir, loop, quiet, verbose) -> None:
    """Walk the whole loop: teacher → distilled int8 packages → simulated fleet → staged rollouts → report.

    Builds (or reuses) the digits teacher and four signed packages — v0 that
    the devices boot with, v1, a better v2 and a deliberately degraded v3 —
    starts an MQTT broker, the
    package server, the collector, the rollout controller and N simulated
    devices with users giving feedback, then rolls out v1, promotes v2 to
    100 % and watches v3 get aborted and rolled back on the feedback gate.
    Ends with the fleet report (table, PNGs, HTML).

    With --loop: devices on v1 meet a shift (digits turned and thicker at half
    of them); the drift alarm and the users' corrections lead to a field
    export, a retrain gated against v1 on the original and the held-out field
    data, and a staged rollout gated on the same field signal, which
    completes only on evidence. Prints the timeline and the negative-feedback
    rate and drift score per phase and version.
    """
    from ..demo import run_demo

    # The parts log every rollback and reconnect as a warning; the demo narrates those itself. The level
    # sits on the handler too: the embedded broker sets amqtt's own logger to WARNING.
    handler = logging.StreamHandler()
    handler.setLevel(logging.WARNING if verbose else logging.ERROR)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    if not verbose:
        # amqtt logs its own QoS 1 retries and timeouts (with tracebacks) when many local clients are busy;
        # the outbox resends and the collector de-duplicates, so they are noise here.
        handler.addFilter(lambda record: not record.name.startswith(("amqtt", "transitions")))
    logging.basicConfig(level=handler.level, handlers=[handler])
    if loop:
        if keep:
            raise click.UsageError("--keep is not available with --loop")
        from ..demo_loop import run_loop

        run_loop(workdir=workdir, devices=devices, fast=fast, broker_url=broker_url, quiet=quiet,
                 cache_dir=cache_dir, echo=click.echo)
        return
    run_demo(workdir=workdir, devices=devices, fast=fast, broker_url=broker_url, keep=keep, quiet=quiet,
             cache_dir=cache_dir, echo=click.echo)
