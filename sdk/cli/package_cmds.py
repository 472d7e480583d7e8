"""``edgeship package ...``: keys, build, sign, verify, inspect ``.edgepkg`` files.

Thin shells over :mod:`edgeship.package` and :mod:`edgeship.signing`.
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from ._common import EdgeshipGroup

__all__ = ["package"]


def _json_arg(value: str | None, what: str):
    """A JSON literal, or @file / a path to a JSON file."""
    if value is None:
        return None
    from ..errors import ConfigError

    text = value
    path = Path(value[1:] if value.startswith("@") else value)
    if value.startswith("@") or (not value.lstrip().startswith(("{", "[")) and path.is_file()):
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read {what} {path}: {exc}") from exc
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{what} is not valid JSON ({exc}); give a JSON object or @file.json") from exc


@click.group(cls=EdgeshipGroup)
def package() -> None:
    """Build, sign, verify and inspect model packages (.edgepkg)."""


@package.command("keygen")
@click.argument("name", type=click.Path(dir_okay=False))
@click.option("--overwrite", is_flag=True, help="Replace an existing key pair.")
def keygen_cmd(name: str, overwrite: bool) -> None:
    """Write an Ed25519 key pair NAME.key (private, mode 0600) and NAME.pub."""
    from ..signing import key_id, keygen, load_public_key

    p = Path(name)
    if p.suffix != ".key":
        p = p.with_name(p.name + ".key")
    priv, pub = keygen(p, overwrite=overwrite)
    click.echo(f"wrote {priv} (private, keep it secret) and {pub} (key id {key_id(load_public_key(pub))})")


@package.command("build")
@click.argument("models", nargs=-1, type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--out", "out", type=click.Path(dir_okay=False), default=None,
              help="The .edgepkg to write (default: NAME-VERSION.edgepkg beside the model).")
@click.option("--config", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A package TOML (name, version, model/[models], preprocess, labels, ...); flags override it.")
@click.option("--name", default=None, help="Package name.")
@click.option("--version", "version", default=None, help="Package version.")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Text file with one class label per line.")
@click.option("--preprocess-json", default=None,
              help='Preprocessing as JSON or @file.json, e.g. \'{"scale": 0.0039, "layout": "NCHW"}\'.')
@click.option("--provenance-json", default=None, help="Provenance (teacher, quantization, ...) as JSON or @file.")
@click.option("--example-input", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A .npy (or .npz for several inputs) used for warm-up.")
@click.option("--report", type=click.Path(exists=True, dir_okay=False), default=None,
              help="report.json from the conversion (measured figures).")
@click.option("--key", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Ed25519 private key: sign the package.")
def build_cmd(models, out, config, name, version, labels, preprocess_json, provenance_json, example_input, report,
              key) -> None:
    """Build a package from MODELS (.onnx / .tflite) plus metadata, or from --config."""
    from ..package import build_from_config, open_package

    model_files = None
    if models:
        model_files = models[0] if len(models) == 1 else list(models)
    path = build_from_config(config, out_path=out, model_files=model_files, name=name, version=version,
                             labels=labels, preprocess=_json_arg(preprocess_json, "--preprocess-json"),
                             provenance=_json_arg(provenance_json, "--provenance-json"),
                             example_input=example_input, report=report, signing_key=key)
    pkg = open_package(path)
    click.echo(f"wrote {path} ({pkg.name} {pkg.version}, {pkg.size} bytes, sha256 {pkg.sha256}, "
               f"{'signed' if pkg.signed else 'unsigned'})")


@package.command("sign")
@click.argument("pkg", type=click.Path(exists=True, dir_okay=False))
@click.option("--key", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Ed25519 private key (from `edgeship package keygen`).")
def sign_cmd(pkg: str, key: str) -> None:
    """Add or replace PKG's signature (manifest.sig); nothing else changes."""
    from ..package import open_package, sign
    from ..signing import key_id, load_private_key

    sign(pkg, key)
    p = open_package(pkg)
    click.echo(f"signed {pkg} with key {key_id(load_private_key(key))} (sha256 now {p.sha256})")


@package.command("verify")
@click.argument("pkg", type=click.Path(exists=True))
@click.option("--key", "keys", multiple=True, type=click.Path(exists=True),
              help="Trusted public key (.pub) or a directory of them; repeatable. With keys, a signature is required.")
@click.option("--require-signature/--no-require-signature", default=None,
              help="Refuse unsigned packages (default: yes when --key is given).")
def verify_cmd(pkg: str, keys: tuple[str, ...], require_signature: bool | None) -> None:
    """Check PKG's hashes, members and signature; exit 0 if it may be used, else one line saying why."""
    from ..package import verify

    p = verify(pkg, list(keys) or None, require_signature=require_signature)
    sig = f"signed by trusted key {p.verified_key}" if p.verified_key else (
        "signed (signature not checked: no --key)" if p.signed else "unsigned")
    click.echo(f"ok: {p.name} {p.version} sha256 {p.sha256}, {len(p.files)} files intact, {sig}")


@package.command("inspect")
@click.argument("pkg", type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON.")
def inspect_cmd(pkg: str, as_json: bool) -> None:
    """Show what PKG holds: identity, files, variants, IO, preprocessing, labels."""
    from ..package import format_inspect, inspect

    info = inspect(pkg)
    click.echo(json.dumps(info, indent=2, default=str) if as_json else format_inspect(info))
