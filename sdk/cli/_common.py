"""Shared CLI plumbing: one-line errors, shared option decorators."""
from __future__ import annotations

import contextlib
import sys

import click

from ..errors import EdgeshipError

__all__ = ["CLIError", "EdgeshipGroup", "fail", "debug_enabled", "DEFAULT_DB", "db_option", "broker_option",
           "fleet_option", "broker_or_embedded", "embedded_broker_line", "mqtt_tls_options", "cli_link_options"]


def debug_enabled() -> bool:
    ctx = click.get_current_context(silent=True)
    while ctx is not None:
        if isinstance(ctx.obj, dict) and ctx.obj.get("debug"):
            return True
        ctx = ctx.parent
    return "--debug" in sys.argv


class CLIError(click.ClickException):
    """Printed as ``error: <message>`` on one line, exit status 1."""

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True, file=file)


def fail(exc: BaseException) -> CLIError:
    """Turn any library error into one clear line for the user."""
    msg = str(exc) or exc.__class__.__name__
    return CLIError(" ".join(msg.split()))


class EdgeshipGroup(click.Group):
    """A click group whose commands print ``error: <one line>`` instead of tracebacks.

    EdgeshipError and OSError become one line; anything else too, prefixed
    with its type so a bug is still recognisable. ``--debug`` re-raises.
    """

    # Sub-groups created with @group.group() get this class too (click honours
    # group_class = type by using the parent's own class).
    group_class = type

    def invoke(self, ctx: click.Context):  # noqa: D401 - click API
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort, KeyboardInterrupt):
            raise
        except EdgeshipError as exc:
            if debug_enabled():
                raise
            raise fail(exc) from exc
        except OSError as exc:
            if debug_enabled():
                raise
            raise fail(exc) from exc
        except Exception as exc:  # a bug: still one line, but say what kind
            if debug_enabled():
                raise
            raise CLIError(f"{type(exc).__name__}: {' '.join(str(exc).split())} (run with --debug for the traceback)") from exc


# -- flags shared by the fleet, rollout and console commands --------------------------

DEFAULT_DB = "edgeship-fleet.sqlite"


def db_option(f):
    return click.option("--db", "db_url", default=DEFAULT_DB, show_default=True, envvar="EDGESHIP_FLEET_DB",
                        help="Fleet DB: a SQLite path, sqlite:///path or postgresql://user@host:port/db.")(f)


def broker_option(f):
    f = mqtt_tls_options(f)
    return click.option("--broker", default=None, envvar="EDGESHIP_BROKER",
                        help="MQTT broker URL (mqtt://host:port, mqtts://...). Default: an embedded broker on 127.0.0.1.")(f)


_MQTT_META = "edgeship.mqtt_link_files"
# (option, envvar, help): the fleet side's broker login and TLS files, like the agent's [mqtt] keys.
_MQTT_TLS_OPTIONS = (
    ("--mqtt-ca", "EDGESHIP_MQTT_CA", "CA certificate (PEM) the broker's certificate must chain to; turns TLS on."),
    ("--mqtt-cert", "EDGESHIP_MQTT_CERT", "Client certificate (PEM) for brokers that require one."),
    ("--mqtt-key", "EDGESHIP_MQTT_KEY", "The client certificate's private key (PEM)."),
    ("--mqtt-username", "EDGESHIP_MQTT_USERNAME", "Broker user name (e.g. the login from `fleet device add --role fleet`)."),
    ("--mqtt-password-file", "EDGESHIP_MQTT_PASSWORD_FILE", "File whose first line is the broker password."),
)


def _remember(ctx: click.Context, param: click.Parameter, value):
    # Kept in ctx.meta (shared by the whole command chain), so commands need no extra parameters.
    ctx.meta.setdefault(_MQTT_META, {})[param.name] = value
    return value


def mqtt_tls_options(f):
    """Add --mqtt-ca/--mqtt-cert/--mqtt-key/--mqtt-username/--mqtt-password-file; read them with :func:`cli_link_options`."""
    for opt, env, text in reversed(_MQTT_TLS_OPTIONS):
        f = click.option(opt, default=None, envvar=env, expose_value=False, callback=_remember, help=text)(f)
    return f


def cli_link_options(broker: str | None, **other):
    """The :class:`edgeship.mqtt.LinkOptions` the command line asks for (``other``: further fields).

    Raises ConfigError in one line for a missing file, or for TLS/login options
    without ``--broker`` (the embedded broker is plain MQTT on 127.0.0.1).
    """
    from ..errors import ConfigError
    from ..mqtt import LinkOptions

    ctx = click.get_current_context(silent=True)
    given = {k: v for k, v in ((ctx.meta if ctx else {}).get(_MQTT_META) or {}).items() if v}
    if given and not broker:
        names = ", ".join("--" + k.replace("_", "-") for k in sorted(given))
        raise ConfigError(f"{names}: only with --broker (the embedded broker is plain MQTT on 127.0.0.1)")
    return LinkOptions.from_files(ca_file=given.get("mqtt_ca"), cert_file=given.get("mqtt_cert"),
                                  key_file=given.get("mqtt_key"), username=given.get("mqtt_username"),
                                  password_file=given.get("mqtt_password_file"), **other)


def fleet_option(f):
    return click.option("--fleet", default="default", show_default=True, help="Fleet id (topic level).")(f)


def embedded_broker_line(url: str) -> str:
    """The start line of a command that runs the embedded broker: it says the broker does not persist."""
    return (f"embedded MQTT broker on {url}: in memory only (devices keep telemetry until the collector's "
            "receipt, but retained state and plans are lost when it stops); for a fleet pass --broker to a "
            "Mosquitto with persistence true (docs/secure-broker.md)")


@contextlib.contextmanager
def broker_or_embedded(url: str | None, *, quiet: bool = False):
    """Yield a broker URL: ``url``, or that of an embedded broker running for the block."""
    if url:
        yield url
        return
    from ..fleet.embedded_broker import EmbeddedBroker

    with EmbeddedBroker() as b:
        if not quiet:
            click.echo(embedded_broker_line(b.url), err=True)
        yield b.url
