"""No insecure default: an agent without trusted keys refuses packages (issue 17, item 16).

Before, ``trusted_keys = []`` (the example config's value) installed unsigned,
tampered and wrongly signed packages. Now that takes ``[agent] allow_unsigned
= true``, which is logged at start and shown in ``/v1/health`` and ``agent doctor``.
Real packages, the real agent, its real HTTP API and the real CLI.
"""
from __future__ import annotations

import json
import logging
import urllib.request

import pytest
from conftest import free_port, run_cli
from test_agent import build_mlp_package

from edgeship import signing
from edgeship.agent import Agent, doctor
from edgeship.agent.config import example_config, load_config, parse_config
from edgeship.errors import SignatureError


def _cfg(tmp_path, pkg, **agent):
    return parse_config({"agent": {"package": str(pkg), "state_dir": str(tmp_path / "state"), **agent},
                         "api": {"enabled": True, "port": free_port()}})


def test_no_keys_refuses_unsigned_and_wrongly_signed_packages(tmp_path):
    other_priv, _ = signing.keygen(tmp_path / "k" / "other.key")
    for pkg in (build_mlp_package(tmp_path / "pkgs", "1.0.0"),
                build_mlp_package(tmp_path / "pkgs", "2.0.0", signing_key=other_priv)):
        agent = Agent(_cfg(tmp_path, pkg))
        with pytest.raises(SignatureError, match=r"trusted_keys is empty.*allow_unsigned = true"):
            agent.start()
        agent.stop()
    assert not list((tmp_path / "state" / "store").glob("[0-9a-f]*")), "nothing was installed"


def test_a_store_filled_while_unsigned_was_allowed_is_not_loaded_without_it(tmp_path):
    pkg = build_mlp_package(tmp_path / "pkgs", "1.0.0")
    with Agent(_cfg(tmp_path, pkg, allow_unsigned=True)) as agent:
        assert agent.model["version"] == "1.0.0"
    agent = Agent(parse_config({"agent": {"state_dir": str(tmp_path / "state")}}))
    with pytest.raises(SignatureError, match="allow_unsigned"):
        agent.start()
    agent.stop()


def test_allow_unsigned_runs_and_says_so_in_the_log_health_and_doctor(tmp_path, caplog):
    pkg = build_mlp_package(tmp_path / "pkgs", "1.0.0")
    cfg = _cfg(tmp_path, pkg, allow_unsigned=True)
    with caplog.at_level(logging.WARNING, logger="edgeship.agent"):
        with Agent(cfg) as agent:
            with urllib.request.urlopen(f"http://127.0.0.1:{cfg.api.port}/v1/health", timeout=10) as r:
                health = json.loads(r.read())
            assert agent.model["version"] == "1.0.0"
    assert health["package_signatures"] == "not checked (allow_unsigned)"
    loud = [r for r in caplog.records if "allow_unsigned = true" in r.getMessage()]
    assert len(loud) == 1 and loud[0].levelno == logging.WARNING
    assert doctor.check_keys([], allow_unsigned=True).status == doctor.WARN
    refused = doctor.check_keys([], allow_unsigned=False)
    assert refused.status == doctor.FAIL and "refuses every package" in refused.detail


def test_signed_package_with_its_key_says_signatures_required(tmp_path, signing_keys):
    priv, pub = signing_keys
    pkg = build_mlp_package(tmp_path / "pkgs", "1.0.0", signing_key=priv)
    with Agent(_cfg(tmp_path, pkg, trusted_keys=[str(pub)])) as agent:
        assert agent.health()["package_signatures"] == "required"


def test_cli_refuses_in_one_line_and_the_example_with_a_key_runs(tmp_path, signing_keys):
    priv, pub = signing_keys
    (tmp_path / "in.jsonl").write_text("")
    unsigned = build_mlp_package(tmp_path / "pkgs", "1.0.0")
    base = dict(state_dir=str(tmp_path / "state"), source=str(tmp_path / "in.jsonl"), port=free_port())
    (tmp_path / "a.toml").write_text(example_config(package=str(unsigned), **base))
    proc = run_cli("agent", "run", "--config", str(tmp_path / "a.toml"), "--until-done", check=False, timeout=120)
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0 and len(err) == 1, proc.stderr
    assert "trusted_keys" in err[0] and "allow_unsigned = true" in err[0]
    for cmd in (("agent", "doctor"), ("agent", "run", "--check")):
        doc = run_cli(*cmd, "--config", str(tmp_path / "a.toml"), check=False, timeout=120)
        assert doc.returncode == 1 and "refuses every package" in doc.stdout, doc.stdout

    signed = build_mlp_package(tmp_path / "pkgs", "2.0.0", signing_key=priv)
    printed = run_cli("agent", "config", "--example", "--package", str(signed), "--trusted-key", str(pub),
                      "--state-dir", base["state_dir"], "--source", base["source"], "--port", str(base["port"])).stdout
    (tmp_path / "b.toml").write_text(printed)
    assert load_config(tmp_path / "b.toml").agent.trusted_keys == [str(pub)]
    run_cli("agent", "run", "--config", str(tmp_path / "b.toml"), "--until-done", timeout=120)
