"""The ``edgeship`` command: a thin shell over the library.

Each command parses flags, calls one library function and turns an
:class:`edgeship.errors.EdgeshipError` into one line ``error: ...`` with a
non-zero exit (a traceback only with ``--debug``). Sub-groups live in their
own modules and import heavy code inside the command body, so
``edgeship agent ...`` on a Pi never imports torch.
"""
from __future__ import annotations

# importlib.util by name: `import importlib` alone does not load it (an editable install's path hook
# happened to, so only a wheel install crashed).
import importlib
import importlib.util

import click

from .._version import __version__
from ._common import EdgeshipGroup

__all__ = ["main", "cli"]

# name -> (module, attribute). Loaded on first use so `edgeship --help` and the
# agent commands stay fast and light.
_SUBCOMMANDS = {
    "package": ("edgeship.cli.package_cmds", "package"),
    "convert": ("edgeship.cli.convert_cmds", "convert"),
    "agent": ("edgeship.cli.agent_cmds", "agent"),
    "bench": ("edgeship.cli.agent_cmds", "bench"),
    "fleet": ("edgeship.cli.fleet_cmds", "fleet"),
    "demo": ("edgeship.cli.demo_cmds", "demo"),
}


class _LazyGroup(EdgeshipGroup):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(name for name, (mod, _) in _SUBCOMMANDS.items() if importlib.util.find_spec(mod))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        entry = _SUBCOMMANDS.get(name)
        if entry is None:
            return None
        mod, attr = entry
        if importlib.util.find_spec(mod) is None:
            return None
        return getattr(importlib.import_module(mod), attr)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgeship")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """edgeship: convert models, run them on devices, roll them out to a fleet."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="edgeship")
