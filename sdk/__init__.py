"""edgeship: ship ML models from a workstation to a fleet of small devices.

The top-level package is light (numpy and the standard library); heavier
parts load lazily. ``edgeship.agent`` runs on the device,
``edgeship.converters`` on the workstation, ``edgeship.fleet`` on the fleet side.
"""
from . import errors
from ._version import __version__

__all__ = ["__version__", "errors"]
