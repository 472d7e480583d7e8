"""One error tree for everything edgeship raises.

Every error says what went wrong *and what to do about it*, in one line, so
the CLI can print ``error: <message>`` and exit non-zero without a traceback.
Third-party failures (onnxruntime, TFLite, paho-mqtt, sqlite3, torch) are
translated where they enter our code and chained with ``raise ... from exc``.

    EdgeshipError
    ├── ConfigError                 bad TOML / option; names the key
    ├── InputError                  a sample the model cannot take (shape, dtype, NaN)
    ├── PackageError                a .edgepkg that must not be used
    │   ├── PackageFormatError      not a zip, truncated, path traversal, unknown format
    │   ├── IntegrityError          a file's bytes differ from the manifest sha256/size
    │   └── SignatureError          unsigned where keys are required, bad or untrusted signature
    ├── ModelError                  a model file the runtime cannot load or run
    │   └── BackendUnavailableError no runtime installed for this model
    ├── DataError                   calibration / training / eval data unusable
    ├── ConversionError             distill / quantize / export / recipe failed
    │   ├── AccuracyBudgetError     no candidate met the accuracy budget
    │   └── RecipeError             unknown key, missing file in a recipe
    ├── StoreError                  device model store / state.json problems
    ├── TransportError              network: MQTT, HTTP downloads
    │   └── DownloadError
    ├── OverloadError               the agent's queue is full under the `reject` policy
    ├── FeedbackUnavailableError    feedback sent to an agent without a feedback component (HTTP 503)
    ├── RolloutError                a rollout plan or command that cannot be applied
    └── FleetDBError                the fleet database refused an operation
"""
from __future__ import annotations

__all__ = [
    "EdgeshipError",
    "ConfigError",
    "InputError",
    "PackageError",
    "PackageFormatError",
    "IntegrityError",
    "SignatureError",
    "ModelError",
    "BackendUnavailableError",
    "DataError",
    "ConversionError",
    "AccuracyBudgetError",
    "RecipeError",
    "StoreError",
    "TransportError",
    "DownloadError",
    "OverloadError",
    "FeedbackUnavailableError",
    "RolloutError",
    "FleetDBError",
]


class EdgeshipError(Exception):
    """Base of every edgeship error. ``str(err)`` is one line meant for a user."""

    def __str__(self) -> str:  # keep CLI output to a single line
        msg = super().__str__()
        return " ".join(msg.split()) if "\n" in msg else msg


class ConfigError(EdgeshipError):
    """A configuration file or option is invalid; the message names the key."""


class InputError(EdgeshipError, ValueError):
    """An input sample does not match the model (name, dtype, shape or values)."""

    def __init__(self, message: str, *, input_name: str | None = None,
                 expected: object = None, got: object = None) -> None:
        super().__init__(message)
        self.input_name = input_name
        self.expected = expected
        self.got = got


class PackageError(EdgeshipError):
    """A model package must not be used."""


class PackageFormatError(PackageError):
    """The package is not a valid .edgepkg (zip, members, manifest schema)."""


class IntegrityError(PackageError):
    """A file in the package differs from what the manifest records."""


class SignatureError(PackageError):
    """The package is unsigned, wrongly signed or signed by an untrusted key."""


class ModelError(EdgeshipError):
    """The model file cannot be loaded or run by the chosen runtime."""


class BackendUnavailableError(ModelError):
    """No installed runtime can run this model file."""


class DataError(EdgeshipError):
    """Data given for calibration, training or evaluation cannot be used."""


class ConversionError(EdgeshipError):
    """A conversion step (distill, quantize, export, evaluate) failed."""


class AccuracyBudgetError(ConversionError):
    """No candidate met the accuracy budget; carries the per-candidate results."""

    def __init__(self, message: str, *, results: object = None) -> None:
        super().__init__(message)
        self.results = results


class RecipeError(ConversionError):
    """A recipe file is invalid (unknown key, missing file, bad value)."""


class StoreError(EdgeshipError):
    """The device model store or its state file cannot be used."""


class TransportError(EdgeshipError):
    """A network operation (MQTT, HTTP) failed."""


class DownloadError(TransportError):
    """A package download failed or delivered the wrong bytes."""


class OverloadError(EdgeshipError):
    """The agent refused a request because its queue is full (policy `reject`)."""


class FeedbackUnavailableError(EdgeshipError):
    """Feedback was sent to an agent that has no feedback component (HTTP 503)."""


class RolloutError(EdgeshipError):
    """A rollout plan or command cannot be applied."""


class FleetDBError(EdgeshipError):
    """The fleet database refused an operation."""
