"""Shared CLI plumbing: one-line errors, shared option decorators."""
from __future__ import annotations

import sys

import click

from ..errors import EdgeshipError

__all__ = ["CLIError", "EdgeshipGroup", "fail", "debug_enabled"]


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
