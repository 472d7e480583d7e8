"""edgeship as installed, not as checked out (issues #16 and #21).

The rest of the suite runs against an editable checkout; users install a
wheel, copy the README's commands and get this month's dependencies. These
tests check the install itself: the package list and package data in
``setup.cfg``, the pinned test environment (``constraints.txt``), the
warning filters, the README's set-up commands, and — marked ``install`` —
a real wheel installed non-editable into fresh virtualenvs, driven from an
empty directory.
"""
from __future__ import annotations

import ast
import configparser
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROOTS = ("sdk", "converters", "device_agent")


def _setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(ROOT / "setup.cfg")
    return cfg


def _lines(value: str) -> list[str]:
    return [line.strip() for line in value.splitlines() if line.strip() and not line.strip().startswith("#")]


def _package_dirs() -> dict[str, str]:
    """setup.cfg ``package_dir``: import name -> folder."""
    pairs = (line.split("=", 1) for line in _lines(_setup_cfg()["options"]["package_dir"]))
    return {name.strip(): folder.strip() for name, folder in pairs}


def _folder_of(package: str) -> str:
    """The source folder setuptools builds ``package`` from (the longest ``package_dir`` prefix wins)."""
    dirs = _package_dirs()
    parts = package.split(".")
    for i in range(len(parts), 0, -1):
        head = ".".join(parts[:i])
        if head in dirs:
            return "/".join([dirs[head], *parts[i:]])
    return "/".join(parts)


def _package_folders() -> dict[str, str]:
    """Every folder with an ``__init__.py`` under the three roots -> the import name it must install as."""
    by_folder = {folder: name for name, folder in _package_dirs().items()}
    found = {}
    for root in ROOTS:
        for init in sorted((ROOT / root).rglob("__init__.py")):
            folder = init.parent.relative_to(ROOT).as_posix()
            if "__pycache__" in folder:
                continue
            head = next(f for f in sorted(by_folder, key=len, reverse=True) if folder == f or folder.startswith(f + "/"))
            found[folder] = ".".join([by_folder[head], *folder[len(head):].strip("/").split("/")]).rstrip(".")
    return found


# ----------------------------------------------------------------------------- packages and package data (#21)

def test_every_package_folder_is_listed_in_setup_cfg():
    listed = set(_lines(_setup_cfg()["options"]["packages"]))
    folders = _package_folders()
    assert set(folders) >= set(_package_dirs().values())
    missing = {f: name for f, name in folders.items() if name not in listed}
    assert not missing, f"folders with an __init__.py that setup.cfg's packages = leaves out (not installed): {missing}"
    for name in listed:
        assert (ROOT / _folder_of(name) / "__init__.py").is_file(), f"setup.cfg lists {name}, which has no folder"


def test_package_data_globs_name_existing_files():
    for package, globs in _setup_cfg()["options.package_data"].items():
        folder = ROOT / _folder_of(package)
        for pattern in (g.strip() for g in globs.split(",")):
            assert list(folder.glob(pattern)), f"package_data {package} = {pattern}: matches nothing in {folder}"


def test_architecture_doc_opens_with_the_folder_to_import_name_table():
    text = (ROOT / "docs" / "architecture.md").read_text()
    first_table = text[text.index("\n|"):].split("\n\n", 1)[0]
    rows = dict(re.findall(r"^\| `([\w/]+)/` \| `([\w.]+)` \|", first_table, re.M))
    assert rows == _package_folders(), "docs/architecture.md's first table must map every package folder"


# ----------------------------------------------------------------------------- sub-modules imported by name (#16)

def _parents_lack(dotted_names: set[str]) -> set[str]:
    """Those ``a.b`` that ``import a`` alone (a fresh interpreter without site) leaves unset."""
    probe = ("import importlib, json, sys\n"
             "out = []\n"
             "for d in sys.argv[1:]:\n"
             "    parent, _, child = d.rpartition('.')\n"
             "    if not hasattr(importlib.import_module(parent), child):\n"
             "        out.append(d)\n"
             "print(json.dumps(out))")
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", probe, *sorted(dotted_names)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout))


def _unimported_submodule_uses() -> list[tuple[str, int, str]]:
    """``a.b.x`` used where the file binds ``a`` by ``import a`` but never imports the stdlib sub-module ``a.b``."""
    hits = []
    for root in ROOTS:
        for path in sorted((ROOT / root).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            imported = set()
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names if a.asname is None]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                for name in names:
                    parts = name.split(".")
                    imported.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
            for node in ast.walk(tree):
                if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)):
                    continue
                root_name, dotted = node.value.id, f"{node.value.id}.{node.attr}"
                if root_name in sys.stdlib_module_names and root_name in imported and dotted not in imported:
                    hits.append((path.relative_to(ROOT).as_posix(), node.lineno, dotted))
    return hits


def test_stdlib_submodules_are_imported_where_they_are_used():
    # `import importlib` then `importlib.util.find_spec(...)` works in an editable checkout only because
    # its path hook imports importlib.util first; from a wheel every CLI command crashed.
    uses = _unimported_submodule_uses()
    missing = _parents_lack({dotted for _, _, dotted in uses if _is_module(dotted)})
    bad = [hit for hit in uses if hit[2] in missing]
    assert not bad, "import the sub-module by name (import a.b) where it is used: " + ", ".join(
        f"{p}:{line} {d}" for p, line, d in bad)


def _is_module(dotted: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(dotted) is not None
    except (ImportError, ValueError):
        return False
