"""``edgeship fleet console`` and ``edgeship fleet console init`` (registered by fleet_cmds)."""
from __future__ import annotations

import click

from ._common import EdgeshipGroup, broker_or_embedded, cli_link_options, mqtt_tls_options

__all__ = ["console"]


@click.group(cls=EdgeshipGroup, invoke_without_command=True)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Fleet config with the [console] section (default $EDGESHIP_FLEET_CONFIG or ~/.config/edgeship/fleet.toml).")
@click.option("--db", "db_url", default="edgeship-fleet.sqlite", show_default=True, envvar="EDGESHIP_FLEET_DB",
              help="Fleet DB: a SQLite path or sqlite:///path.")
@click.option("--broker", default=None, envvar="EDGESHIP_BROKER",
              help="MQTT broker URL the console collects from and runs rollouts on. Default: an embedded broker on 127.0.0.1.")
@mqtt_tls_options
@click.option("--fleet", "fleet_name", default="default", show_default=True, help="Fleet name (MQTT topic level).")
@click.option("--host", default=None, help="Address to bind (default from config, 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (default from config, 8080).")
@click.option("--serve-packages", "packages_dir", type=click.Path(file_okay=False, exists=True), default=None,
              help="Also serve this directory's .edgepkg files to devices and offer them for rollouts.")
@click.option("--key", "signing_key", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Ed25519 private key the controller signs rollout plans with.")
@click.pass_context
def console(ctx: click.Context, config_path, db_url, broker, fleet_name, host, port, packages_dir, signing_key) -> None:
    """Serve the fleet web console (devices, rollouts, feedback) and its JSON API."""
    if ctx.invoked_subcommand is not None:
        return
    from ..fleet.console import FleetConsole

    opts = cli_link_options(broker)
    with broker_or_embedded(broker) as url, FleetConsole.open(
            config=config_path, db=db_url, broker=url, fleet=fleet_name, host=host, port=port,
            packages_dir=packages_dir, signing_key=signing_key, link_options=opts) as c:
        click.echo(f"console on {c.url}  (Ctrl-C to stop)", err=True)
        try:
            c.wait()
        except KeyboardInterrupt:
            click.echo("stopping", err=True)


@console.command("init")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Fleet config to write (default $EDGESHIP_FLEET_CONFIG or ~/.config/edgeship/fleet.toml).")
@click.option("--user", default="admin", show_default=True)
@click.option("--password", default=None, help="Login password (prompted when omitted and --no-password is not given).")
@click.option("--no-password", is_flag=True, help="Token only: log in with the API token.")
@click.option("--session-ttl", "session_ttl_s", type=float, default=8 * 3600.0, show_default=True,
              help="Seconds a login lasts.")
@click.option("--tls-cert", default="", help="PEM certificate: serve HTTPS.")
@click.option("--tls-key", default="", help="PEM private key for --tls-cert.")
@click.option("--force", is_flag=True, help="Replace an existing [console] section.")
def init(config_path, user, password, no_password, session_ttl_s, tls_cert, tls_key, force) -> None:
    """Create the console's login (password hash and API token) in the fleet config."""
    from ..fleet.console.config import init_console_config

    if password is None and not no_password:
        password = click.prompt("console password", hide_input=True, confirmation_prompt=True)
    path, token = init_console_config(config_path, user=user, password=password or None, with_token=True,
                                      session_ttl_s=session_ttl_s, tls_cert=tls_cert, tls_key=tls_key, force=force)
    click.echo(f"wrote [console] to {path}")
    click.echo(f"API token (shown once, stored hashed): {token}")
