"""``edgeship agent ...`` and ``edgeship bench``: thin shells over :mod:`edgeship.agent`.

Other groups' engineers add subcommands to ``agent`` here (``feedback``,
``pin``, ``doctor``, ``install-service``): one function each, flags in, one
library call, errors out.
"""
from __future__ import annotations

import json
import logging
import sys

import click

from ._common import EdgeshipGroup

__all__ = ["agent", "bench"]


@click.group(cls=EdgeshipGroup)
def agent() -> None:
    """Run and configure the on-device agent."""


@agent.command("run")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="The agent's TOML config (edgeship agent config --example).")
@click.option("--check", is_flag=True, help="Only validate the config and exit.")
@click.option("--until-done", is_flag=True, help="Exit once every (finite) source is read and answered.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default=None,
              help="Overrides [agent] log_level.")
def run_cmd(config_path: str, check: bool, until_done: bool, log_level: str | None) -> None:
    """Serve the model: sources -> batcher -> runner -> sinks, plus the local API, until SIGTERM."""
    from ..agent.config import load_config

    cfg = load_config(config_path)
    if check:
        from ..agent import doctor

        click.echo(f"config ok: {config_path} ({len(cfg.sources)} sources, {len(cfg.sinks)} sinks, "
                   f"api {'on' if cfg.api.enabled else 'off'})")
        checks = doctor.serving_checks(cfg)
        click.echo(doctor.format_checks(checks))
        if doctor.summarize(checks)[2]:
            sys.exit(1)
        return
    logging.basicConfig(level=(log_level or cfg.agent.log_level).upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ..agent.runner_main import run_agent

    sys.exit(run_agent(cfg, until_done=until_done))


@agent.command("config")
@click.option("--example", is_flag=True, required=True, help="Print a commented example config.")
@click.option("--package", default=None, help="Fill in [agent] package (the .edgepkg to serve).")
@click.option("--state-dir", default=None, help="Fill in [agent] state_dir.")
@click.option("--broker", default=None, help="Fill in [mqtt] broker (mqtt://host:1883): report and take rollouts.")
@click.option("--source", default=None, help="Fill in the JSON-lines source's path (\"-\" = stdin).")
@click.option("--port", type=int, default=None, help="Fill in [api] port.")
@click.option("--trusted-key", "trusted_keys", multiple=True,
              help="Fill in [agent] trusted_keys: a .pub key packages must be signed with (repeatable).")
def config_cmd(example: bool, package, state_dir, broker, source, port, trusted_keys) -> None:
    """Print a commented example agent.toml (relative paths are relative to the file)."""
    from ..agent.config import example_config

    click.echo(example_config(package=package, state_dir=state_dir, broker=broker, source=source, port=port,
                              trusted_keys=list(trusted_keys)), nl=False)


@click.command("bench")
@click.argument("package", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--threads", type=int, default=None, help="Intra-op threads of the runtime (default: its choice).")
@click.option("--backend", default=None, help="onnxruntime or tflite (default: the package's default variant).")
@click.option("--seconds", type=float, default=1.0, show_default=True, help="Time per throughput measurement.")
@click.option("--variant", default=None, help="Variant id to measure, e.g. onnx-int8 (default: the package's).")
def bench(package: str, as_json: bool, threads: int | None, backend: str | None, seconds: float,
          variant: str | None) -> None:
    """Measure a package on this device: load, warm-up, latency, throughput (raw and through the agent), RSS."""
    from ..agent.bench import format_bench, run_bench

    result = run_bench(package, threads=threads, backend=backend, seconds=seconds, quiet=as_json, variant=variant)
    click.echo(json.dumps(result, indent=2) if as_json else format_bench(result))


@agent.command("feedback")
@click.argument("prediction_id")
@click.option("--correct", "kind", flag_value="correct", help="The prediction was right.")
@click.option("--incorrect", "kind", flag_value="incorrect", help="The prediction was wrong.")
@click.option("--label", default=None, help="The correct label.")
@click.option("--rating", type=float, default=None, help="A numeric rating.")
@click.option("--comment", default=None, help="Free text.")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The agent's TOML config: its [api] address (and token) is used.")
@click.option("--api", default=None, envvar="EDGESHIP_AGENT_API",
              help="The agent's local API: http://127.0.0.1:8765 (default) or unix:/path/to/socket.")
def feedback_cmd(prediction_id, kind, label, rating, comment, config_path, api) -> None:
    """Tell the running agent whether a prediction was right (sent to the fleet via the outbox)."""
    from ..agent.feedback import send_feedback
    from ..errors import InputError

    given = [(k, v) for k, v in (("label", label), ("rating", rating), ("comment", comment)) if v is not None]
    if kind:
        given.insert(0, (kind, None))
    if len(given) != 1:
        raise InputError("give exactly one of --correct, --incorrect, --label L, --rating N, --comment TEXT")
    token = None
    if config_path:
        from ..agent.api import read_token
        from ..agent.config import load_config

        a = load_config(config_path).api
        token = read_token(a)
        if api is None:
            api = f"unix:{a.unix_socket}" if a.unix_socket else f"http://{a.host}:{a.port}"
    out = send_feedback(api or "http://127.0.0.1:8765", prediction_id, *given[0], token=token.decode() if token else None)
    click.echo(f"feedback stored (msg_id {out.get('msg_id')})")


@agent.command("doctor")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Read state_dir, [mqtt] broker, trusted_keys and [rollout] server_url from this config.")
@click.option("--state-dir", default=None, help="The agent's state directory (disk checks).")
@click.option("--broker", default=None, help="MQTT broker URL to try (mqtt://host:port).")
@click.option("--server", default=None, help="Fleet HTTP server to compare the clock with.")
@click.option("--trusted-key", "trusted_keys", multiple=True, help="A trusted .pub key (repeatable).")
def doctor_cmd(config_path, state_dir, broker, server, trusted_keys) -> None:
    """Check what this device needs (runtimes, CPU, disk, memory, broker, keys, clock) and say what to fix."""
    from ..agent import doctor

    keys = list(trusted_keys)
    cfg = None
    if config_path:
        from ..agent.config import load_config

        cfg = load_config(config_path)
        state_dir = state_dir or cfg.agent.state_dir
        broker = broker or cfg.mqtt.broker
        server = server or cfg.rollout.server_url
        keys = keys or list(cfg.agent.trusted_keys)
    checks = doctor.run_checks(state_dir=state_dir or ".", broker_url=broker, trusted_keys=keys, server_url=server,
                               config=cfg)
    click.echo(doctor.format_checks(checks))
    if doctor.summarize(checks)[2]:
        sys.exit(1)


@agent.command("install-service")
@click.option("--config", "config_path", required=True, help="The agent's TOML config the unit will run.")
@click.option("--user", default="edgeship", show_default=True, help="The service user.")
@click.option("--group", default=None, help="The service group (default: the user).")
@click.option("--state-dir", default="/var/lib/edgeship", show_default=True, help="The agent's state directory.")
@click.option("--executable", default=None, help="The edgeship script to run (default: found on PATH).")
@click.option("--watchdog-s", type=int, default=30, show_default=True, help="systemd WatchdogSec.")
@click.option("--output", default=None, help="Write the unit here instead of /etc/systemd/system/.")
@click.option("--enable", is_flag=True, help="Reload systemd and enable + start the unit.")
def install_service_cmd(config_path, user, group, state_dir, executable, watchdog_s, output, enable) -> None:
    """Write the systemd unit (Type=notify, watchdog, restart) that runs `edgeship agent run`."""
    from ..agent.service import DEFAULT_UNIT_PATH, ServiceSpec, install_service

    spec = ServiceSpec(config=config_path, user=user, group=group, state_dir=state_dir, executable=executable,
                       watchdog_s=watchdog_s)
    path = install_service(spec, path=output or DEFAULT_UNIT_PATH, enable=enable)
    click.echo(f"wrote {path}")


@agent.command("pin")
@click.argument("version", required=False)
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The agent's TOML config: its [agent] state_dir is used.")
@click.option("--state-dir", default=None, type=click.Path(file_okay=False), help="The agent's state directory.")
@click.option("--clear", is_flag=True, help="Unpin: rollouts may switch this device again.")
def pin_cmd(version, config_path, state_dir, clear) -> None:
    """Hold this device on VERSION (rollouts skip it and report it as pinned), or --clear the pin."""
    from ..agent.store import ModelStore
    from ..errors import ConfigError

    if state_dir is None:
        if config_path is None:
            raise ConfigError("give --config agent.toml or --state-dir DIR")
        from ..agent.config import load_config

        state_dir = load_config(config_path).agent.state_dir
    if clear == bool(version):
        raise ConfigError("give a VERSION to pin, or --clear (not both)")
    store = ModelStore(state_dir)
    sha = store.pin(None if clear else version)
    if clear:
        click.echo("unpinned: rollouts may switch this device again")
    else:
        click.echo(f"pinned to {version} ({sha[:12]}); a running agent keeps its model until restarted "
                   "and no rollout switches it")
