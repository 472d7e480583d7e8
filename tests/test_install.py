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
import os
import re
import subprocess
import sys
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
            head = next(f for f in sorted(by_folder, key=len, reverse=True)
                        if folder == f or folder.startswith(f + "/"))
            rest = folder[len(head):].strip("/")
            found[folder] = by_folder[head] + (f".{rest.replace('/', '.')}" if rest else "")
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


# ----------------------------------------------------------------------------- set-up commands and pins (#16)

def _setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Set up\n", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"^```[^\n]*\n(.*?)^```", section, re.M | re.S)]


def test_readme_has_two_set_up_commands_and_ci_runs_the_test_one_verbatim():
    demo_cmd, test_cmd = _setup_commands()  # exactly two
    for cmd in (demo_cmd, test_cmd):
        assert "\n" not in cmd and cmd.startswith("pip install -c constraints.txt -e "), cmd
    assert demo_cmd.endswith("&& edgeship demo") and test_cmd.endswith("&& python -m pytest -q")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd in ci, ".ci/run must run the README's test command verbatim"
    comment = ci[ci.index(test_cmd) - 1]
    assert comment.startswith("#") and "identical" in comment


def test_constraints_pin_exactly_what_the_extras_pull_as_installed_here():
    pins = (ROOT / "constraints.txt").read_text().splitlines()
    assert "torch==2.13.0" in pins
    # Every distribution [all,test] pulls is pinned at the installed version, nothing else is, and the
    # installed set meets every requirement among them (what pip check would say).
    proc = subprocess.run([sys.executable, str(ROOT / ".ci" / "constraints.py"), "--check"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_constraints_check_names_missing_stale_and_unused_pins(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("ci_constraints", ROOT / ".ci" / "constraints.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    pins = tmp_path / "constraints.txt"
    pins.write_text("# header\nnumpy==2.4.6\nTorch==2.12.0  # stale\nleftpad==1.0\n")
    installed = {"numpy": "2.4.6", "torch": "2.13.0", "click": "8.5.1"}
    assert tool.differences(tool.read(pins), installed) == [
        "click: installed 8.5.1, not pinned", "torch: pinned 2.12.0, installed 2.13.0",
        "leftpad: pinned 1.0, but nothing requires it"]
    assert tool.differences(tool.read(pins), {"numpy": "2.4.6", "torch": "2.12.0", "leftpad": "1.0"}) == []


# ----------------------------------------------------------------------------- warnings: ours fatal, others not (#16)

_WARNING_TESTS = '''
import warnings

import thirdparty_lib


def test_a_third_party_warning_is_reported():
    thirdparty_lib.noisy()


def test_a_warning_in_edgeship_fails():
    exec("import warnings; warnings.warn('ours', UserWarning)", {"__name__": "edgeship.fake"})


def test_a_deprecated_call_from_edgeship_fails():
    # Warns at stacklevel=2, that is at the calling line: in edgeship code.
    exec("import thirdparty_lib; thirdparty_lib.deprecated()", {"__name__": "edgeship.fake"})


def test_a_warning_in_a_test_fails():
    warnings.warn("from the test itself", UserWarning)
'''

_THIRD_PARTY_LIB = '''
import warnings


def noisy():
    warnings.warn("a third-party library's own warning", FutureWarning)


def deprecated():
    warnings.warn("deprecated(): use something else", DeprecationWarning, stacklevel=2)
'''

# A third-party pytest plugin, installed (entry point), that warns while pytest imports it: what anyio's
# plugin does under pytest 9.2 (from _pytest.python import CallSpec2 -> PytestRemovedIn10Warning).
_THIRD_PARTY_PLUGIN = '''
import warnings

warnings.warn("thirdparty_plugin uses an alias that goes away in the next major release", DeprecationWarning)
'''


def _warnings_project(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A tiny project with this project's ``[tool:pytest]`` section verbatim, and a third-party plugin + library."""
    section = "[tool:pytest]" + (ROOT / "setup.cfg").read_text().split("[tool:pytest]", 1)[1].split("\n[", 1)[0]
    project = tmp_path / "project"
    (project / "tests").mkdir(parents=True)
    (project / "setup.cfg").write_text(section + "\n")
    (project / "tests" / "test_warnings.py").write_text(_WARNING_TESTS)
    site = tmp_path / "site"
    (site / "thirdparty_plugin-1.0.dist-info").mkdir(parents=True)
    (site / "thirdparty_lib.py").write_text(_THIRD_PARTY_LIB)
    (site / "thirdparty_plugin.py").write_text(_THIRD_PARTY_PLUGIN)
    (site / "thirdparty_plugin-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: thirdparty-plugin\nVersion: 1.0\n")
    (site / "thirdparty_plugin-1.0.dist-info" / "entry_points.txt").write_text(
        "[pytest11]\nthirdparty = thirdparty_plugin\n")
    return project, {"PYTHONPATH": str(site)}


def _run_pytest(python: str, project: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, dict[str, str]]:
    proc = subprocess.run([python, "-m", "pytest", "-rA", "-p", "no:cacheprovider"], cwd=project,
                          env={**os.environ, **env, "PYTHONDONTWRITEBYTECODE": "1"}, capture_output=True, text=True,
                          timeout=120)
    outcomes = dict((name, outcome) for outcome, name in
                    re.findall(r"^(PASSED|FAILED|ERROR) tests/test_warnings\.py::(\w+)", proc.stdout, re.M))
    return proc, outcomes


_EXPECTED = {"test_a_third_party_warning_is_reported": "PASSED", "test_a_warning_in_edgeship_fails": "FAILED",
             "test_a_deprecated_call_from_edgeship_fails": "FAILED", "test_a_warning_in_a_test_fails": "FAILED"}


def test_warnings_are_errors_in_our_code_only(tmp_path):
    project, env = _warnings_project(tmp_path)
    proc, outcomes = _run_pytest(sys.executable, project, env)
    assert outcomes == _EXPECTED, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "a third-party library's own warning" in proc.stdout  # reported in the summary, not hidden


# ----------------------------------------------------------------------------- the wheel, installed (#16, #21)
#
# Built from a clean copy of the sources (a stale build/ folder in the checkout cannot leak into it) and
# installed non-editable into fresh virtualenvs, then driven from an empty directory with a PATH and an
# environment that lead to nothing in this checkout. Each step's time is printed (pytest -s shows it).

SOURCES = ("setup.cfg", "pyproject.toml", "README.md", *ROOTS)
# Any of these in a venv that claims to be agent-only would mean the workstation stack came along.
WORKSTATION = ("torch", "onnx", "tensorflow", "jax", "litert_torch", "ai_edge_quantizer", "sklearn")


def _timed(label: str, fn):
    import time

    t0 = time.monotonic()
    out = fn()
    print(f"\n[install timing] {label}: {time.monotonic() - t0:.1f} s")
    return out


def _check(proc: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"{what} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


class Venv:
    """A fresh virtualenv; commands run with its bin/ first on PATH and nothing of this checkout visible."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.bin = path / "bin"
        self.site = next((path / "lib").glob("python3*/site-packages"))

    @classmethod
    def create(cls, path: Path, *, see_our_packages: bool = False) -> "Venv":
        # No pip of its own (ensurepip costs ~10 s): this interpreter's pip installs into it (pip --python).
        _check(subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], capture_output=True,
                              text=True, timeout=300), "python -m venv")
        venv = cls(path)
        if see_our_packages:
            # This environment's packages (torch, onnx, ... as constraints.txt pins them) without installing them
            # again. Path lines, unlike --system-site-packages, run no .pth hooks from those folders: they hold
            # editable edgeship installs, whose finder would import importlib.util at start-up and hide the very
            # crash of #16, and would serve this checkout instead of the wheel.
            import site

            (venv.site / "_our_site_packages.pth").write_text("".join(f"{p}\n" for p in site.getsitepackages()))
        return venv

    def env(self, **extra: str) -> dict[str, str]:
        outside = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                                  if p and not p.startswith((sys.prefix, str(ROOT))))
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        return {**env, "PATH": f"{self.bin}{os.pathsep}{outside}", "VIRTUAL_ENV": str(self.path),
                "PYTHONDONTWRITEBYTECODE": "1", **extra}

    def run(self, *args: str, cwd: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), cwd=cwd, env=self.env(**env), capture_output=True, text=True,
                              timeout=timeout)

    def pip_install(self, *reqs: str, cwd: Path, constraints: bool = True) -> None:
        pins = ["-c", str(ROOT / "constraints.txt")] if constraints else []
        _check(self.run(sys.executable, "-m", "pip", "--python", str(self.bin / "python"), "install", "-q", *pins,
                        *reqs, cwd=cwd, timeout=600), f"pip install {' '.join(reqs)}")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    import shutil

    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    # Built with this environment's setuptools (constraints.txt pins it): an isolated build env would fetch and
    # install setuptools again each run (~25 s of the ~30).
    _timed("pip wheel --no-deps", lambda: _check(subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"),
         str(src)], capture_output=True, text=True, timeout=600), "pip wheel"))
    (built,) = (tmp / "dist").glob("edgeship-*.whl")
    return built


@pytest.fixture(scope="module")
def full_venv(wheel, tmp_path_factory) -> Venv:
    """The wheel with [all], non-editable; the heavy dependencies are the ones this environment has."""
    tmp = tmp_path_factory.mktemp("full")
    venv = _timed("venv + pip install wheel[all] (our packages visible)",
                  lambda: _install(Venv.create(tmp / "venv", see_our_packages=True), f"{wheel}[all]", tmp))
    return venv


@pytest.fixture(scope="module")
def agent_venv(wheel, tmp_path_factory) -> Venv:
    """The Raspberry Pi route: a bare venv, the wheel with [agent] only (dependencies from the registry)."""
    tmp = tmp_path_factory.mktemp("agent")
    return _timed("venv + pip install wheel[agent] (bare)", lambda: _install(Venv.create(tmp / "venv"),
                                                                              f"{wheel}[agent]", tmp))


def _install(venv: Venv, requirement: str, cwd: Path) -> Venv:
    venv.pip_install(requirement, cwd=cwd)
    where = _check(venv.run(str(venv.bin / "python"), "-c", "import edgeship; print(edgeship.__file__)", cwd=cwd),
                   "import edgeship").stdout.strip()
    # The installed copy, not this checkout's (nor an editable install the base interpreter may have).
    assert Path(where).is_relative_to(venv.site), where
    return venv


def _empty_dir(tmp_path: Path) -> Path:
    d = tmp_path / "empty"
    d.mkdir()
    return d


def _wheel_files(whl: Path) -> set[str]:
    import zipfile

    with zipfile.ZipFile(whl) as z:
        return set(z.namelist())


@pytest.mark.install
def test_wheel_holds_every_module_template_static_file_and_the_demo(wheel):
    files = _wheel_files(wheel)
    expected = set()
    for folder, package in _package_folders().items():
        for f in (ROOT / folder).iterdir():
            if f.suffix == ".py":
                expected.add(f"{package.replace('.', '/')}/{f.name}")
    console = ROOT / _folder_of("edgeship.fleet.console")
    for sub in ("templates", "static"):
        data = [p for p in (console / sub).rglob("*") if p.is_file()]
        assert data, f"no console {sub}?"
        expected |= {f"edgeship/fleet/console/{p.relative_to(console).as_posix()}" for p in data}
    expected |= {"edgeship/py.typed", "edgeship/demo_data/model.py", "edgeship/demo_data/prepare.py"}
    assert not expected - files, f"missing from the wheel: {sorted(expected - files)}"


@pytest.mark.install
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_wheel_install_runs_the_cli_and_the_demo_from_an_empty_directory(full_venv, tmp_path):
    from edgeship import demo
    from edgeship.fleet.db import FleetDB

    here = _empty_dir(tmp_path)
    edgeship = str(full_venv.bin / "edgeship")
    out = _check(full_venv.run(edgeship, "--help", cwd=here), "edgeship --help").stdout
    assert all(cmd in out for cmd in ("agent", "bench", "convert", "demo", "fleet", "package")), out
    # A fresh model cache too: the demo trains its teacher and students from the data the package ships.
    proc = _timed("edgeship demo --fast (from the wheel, empty cache)", lambda: full_venv.run(
        edgeship, "demo", "--fast", "--quiet", cwd=here, timeout=840, EDGESHIP_CACHE_DIR=str(tmp_path / "cache")))
    _check(proc, "edgeship demo --fast")
    with FleetDB.open(here / "edgeship-demo" / "fleet.sqlite") as db:
        states = {r["package_version"]: r["state"] for r in db.rollouts_all()}
        versions = {d["model_version"] for d in db.devices(demo.FLEET)}
    v = demo.VERSIONS
    assert states == {v["v1"]: "completed", v["v2"]: "completed", v["v3"]: "aborted"}, states
    assert versions == {v["v2"]}, versions


@pytest.mark.install
@pytest.mark.timeout(900)
def test_agent_only_install_from_the_wheel_serves_without_the_workstation_stack(agent_venv, tmp_path):
    # The Raspberry Pi route (docs/raspberry-pi.md): the wheel copied over, pip install "edgeship-*.whl[agent]".
    here = _empty_dir(tmp_path)
    python, edgeship = str(agent_venv.bin / "python"), str(agent_venv.bin / "edgeship")
    probe = ("import importlib.util, json, sys\n"
             "import edgeship.agent, edgeship.cli.agent_cmds\n"
             f"print(json.dumps([m for m in {WORKSTATION!r} if importlib.util.find_spec(m) or m in sys.modules]))")
    assert json.loads(_check(agent_venv.run(python, "-c", probe, cwd=here), "import probe").stdout) == []

    example = _check(agent_venv.run(edgeship, "agent", "config", "--example", cwd=here), "agent config").stdout
    state = here / "state"
    cfg = here / "agent.toml"
    cfg.write_text(re.sub(r"(?m)^state_dir = .*$", f"state_dir = {json.dumps(str(state))}", example))
    doctor = agent_venv.run(edgeship, "agent", "doctor", "--config", str(cfg), cwd=here)
    # Exit 1 means doctor found something to fix, which is a verdict; a crash is not.
    assert doctor.returncode in (0, 1) and "Traceback" not in doctor.stderr, doctor.stdout + doctor.stderr
    assert re.search(r"^OK\s+onnxruntime", doctor.stdout, re.M), doctor.stdout
    assert re.search(r"^\d+ ok, \d+ warnings?, \d+ failed", doctor.stdout, re.M), doctor.stdout

    pkg = _tiny_package(tmp_path / "pkg")
    bench = _check(agent_venv.run(edgeship, "bench", str(pkg), "--json", "--seconds", "0.2", cwd=here), "bench")
    result = json.loads(bench.stdout)
    assert result["model"] == {"name": "tiny", "version": "1.0.0"}
    assert result["backend"].startswith("onnxruntime") and result["raw_latency_ms_b1"]["count"] > 0


def _tiny_package(out: Path) -> Path:
    import numpy as np
    from models import make_mlp_onnx

    from edgeship import package

    onnx_path = make_mlp_onnx(out / "mlp.onnx")
    return package.build(out / "tiny-1.0.0.edgepkg", onnx_path, name="tiny", version="1.0.0",
                         labels=[str(i) for i in range(10)], example_input=np.zeros((1, 64), np.float32))


@pytest.mark.install
def test_pytest_9_2_with_anyio_runs_under_our_warning_filters(tmp_path):
    # The fresh machine of #16: pytest 9.2 applies the ini filters while importing plugins, and anyio 4.14's
    # plugin imports pytest's renamed CallSpec2. Under a plain `error` filter nothing ran (exit 3).
    venv = Venv.create(tmp_path / "venv")
    _timed("venv + pytest 9.2 + anyio 4.14.2", lambda: venv.pip_install(
        "pytest==9.2.0", "anyio==4.14.2", "pytest-timeout==2.4.0", cwd=tmp_path, constraints=False))
    project, env = _warnings_project(tmp_path)
    proc, outcomes = _run_pytest(str(venv.bin / "python"), project, env)
    assert "Error while loading plugin" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert outcomes == _EXPECTED, proc.stdout[-3000:] + proc.stderr[-2000:]
