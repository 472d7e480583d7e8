"""Benchmark for issue 22 (the field loop): does a model retrained on what the field reported win the field back?

    python benchmarks/loop.py [--fast] [--devices N] [--curve 0,25,50,100,200,400,all] [--seeds 0,1,2]

Runs ``edgeship demo --loop`` (:func:`edgeship.demo_loop.run_loop`, embedded
broker, real agents, collector, controller, SQLite) and prints:

* the field negative-feedback rate before the shift (v1), under the shift
  (v1) and after the rollout (the retrained version) — all devices, and the
  shifted devices alone;
* the top-1 accuracy of v1 and of the retrained version on the original test
  set and on the held-out field set (devices never trained on);
* minutes from the first drift alarm to the completed rollout;
* drift alarms: windows in alarm before the shift (every device on ordinary
  digits: false alarms) and under it on the shifted devices, with the
  calibrated thresholds the devices applied and with the old fixed rule
  (PSI > 0.2 or |z| > 0.5 on any statistic) re-applied to the same windows;
* the drift score after the rollout against the retrained package's own
  reference and against v1's (the devices' ``vs_previous``);
* the curve: held-out field accuracy against the number of distinct field
  samples used in training (the loop's retrain recipe again, with
  ``[field] max_samples`` = N; 0 = no field data, ``mix = 0``), over
  ``--seeds`` (the distill seed and the subsample's): mean, min and max.

Writes ``benchmarks/out/loop.json``. Timing-sensitive: run it under
``flock /tmp/bench.lock`` on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUT = ROOT / "benchmarks" / "out"


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _num(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _curve_point(recipe: Path, n: str, work: Path, seed: int = 0) -> dict:
    """The loop's retrain recipe with ``max_samples = n`` (0: no field data) and ``seed`` (distill and the
    field subsample); the gate's figures."""
    from edgeship.converters.recipe import run_recipe

    text = recipe.read_text()
    out = work / f"curve-{n}-s{seed}"
    text = re.sub(r'^out_dir = .*$', f"out_dir = {json.dumps(str(out))}", text, flags=re.M)
    text = re.sub(r"^seed = .*$", f"seed = {seed}", text, flags=re.M)  # [distill] seed
    text = re.sub(r"^mix = .*$", "mix = 0.0" if n == "0" else r"\g<0>", text, flags=re.M)
    # The curve wants the figures whatever they are: a gate that never refuses.
    text = re.sub(r"^max_regress = .*$", "max_regress = 1000.0", text, flags=re.M) + "min_gain = -1000.0\n"
    text += f"seed = {seed}\n"  # [field] seed: which samples a max_samples subsample keeps
    if n not in ("0", "all"):
        text += f"max_samples = {int(n)}\n"
    path = work / f"curve-{n}-s{seed}.toml"
    path.write_text(text)
    t = time.monotonic()
    res = run_recipe(path, quiet=True)
    g, f = res.step("field_gate").info, res.step("field_data").info
    return {"max_samples": n, "seed": seed, "field_train_used": 0 if n == "0" else f["field_train"],
            "field_new": g["field_new"], "field_serving": g["field_serving"], "original_new": g["original_new"],
            "original_serving": g["original_serving"], "seconds": round(time.monotonic() - t, 1)}


def _spread(vals: list[float]) -> str:
    return f"{sum(vals) / len(vals):6.2f} [{min(vals):.2f}-{max(vals):.2f}]"


def _alarm_counts(db_path: Path, phases: dict, shifted: set[str]) -> dict:
    """Windows in alarm before the shift (all devices) and under it (shifted devices, v1): as the devices judged
    them (calibrated for each window's size) and under the old fixed rule re-applied to the same scores."""
    from edgeship.drift import is_alarm
    from edgeship.fleet.db import FleetDB
    from edgeship.fleet.figures import window_body

    def old_rule(d: dict) -> bool:
        p = d.get("predictions") or {}
        return (any(is_alarm(s.get("psi"), s.get("z")) for s in (d.get("inputs") or {}).values())
                or is_alarm(p.get("psi")) or is_alarm(p.get("confidence_psi")))

    out = {}
    with FleetDB.open(db_path) as db:
        for name, (a, b), devs in (("before", phases["before"], None), ("shift", phases["shift"], shifted)):
            judged = [d for r in db.telemetry(since=a, until=b)
                      if r["model_version"] == "1.0.0" and (devs is None or r["device"] in devs)
                      and (d := window_body(r).get("drift") or {}).get("alarm") is not None]
            out[name] = {"windows": len(judged), "calibrated": sum(bool(d["alarm"]) for d in judged),
                         "old_rule": sum(old_rule(d) for d in judged),
                         "predictions": sorted(sum((d.get("predictions") or {}).get("class_counts") or [0])
                                               for d in judged)[len(judged) // 2] if judged else None}
    return out


def _broker(how: str, work: Path):
    """(process or None, broker URL or None for the embedded one)."""
    import shutil
    import socket
    import subprocess

    if how == "embedded":
        return None, None
    if how != "auto":
        return None, how
    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if exe is None:
        return None, None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = work / "mosquitto.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    + ("user root\n" if os.geteuid() == 0 else ""))  # root: keep it, as tests/conftest.py does
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"mqtt://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.terminate()
    raise SystemExit(f"mosquitto did not start on port {port}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fast", action="store_true", help="the --fast demo settings (fewer samples, shorter soaks)")
    ap.add_argument("--devices", type=int, default=None)
    ap.add_argument("--curve", default="0,25,50,100,200,400,all",
                    help="field samples used for the accuracy curve (comma-separated; 'all'; empty: no curve)")
    ap.add_argument("--seeds", default="0,1,2", help="seeds per curve point (comma-separated): mean, min, max")
    ap.add_argument("--workdir", default=None, help="keep the run here (default: a temporary folder)")
    ap.add_argument("--reuse", action="store_true",
                    help="with --workdir: print the figures of the loop run already there and only draw the curve")
    ap.add_argument("--broker", default="auto",
                    help="MQTT broker: a URL, 'embedded' (amqtt, what `edgeship demo` starts), or 'auto': a local "
                         "Mosquitto when installed (the embedded broker falls behind on a loaded machine)")
    args = ap.parse_args()

    from edgeship.demo_loop import RETRAINED_VERSION, SERVING_VERSION, phase_table, run_loop

    # As `edgeship demo` does: the embedded broker's own QoS 1 retry chatter is noise here (the outbox resends,
    # the collector de-duplicates); errors still show.
    handler = logging.StreamHandler()
    handler.setLevel(logging.ERROR)
    handler.addFilter(lambda record: not record.name.startswith(("amqtt", "transitions")))
    logging.basicConfig(level=logging.ERROR, handlers=[handler])

    tmp = tempfile.TemporaryDirectory(prefix="edgeship-loop-bench-")
    work = Path(args.workdir or tmp.name)
    t0 = time.monotonic()
    url = None
    if args.reuse and (work / "demo" / "loop.json").is_file():
        res = json.loads((work / "demo" / "loop.json").read_text())
        loop_s = res["seconds"]
    else:
        broker, url = _broker(args.broker, work)
        try:
            res = run_loop(workdir=work / "demo", devices=args.devices, fast=args.fast, quiet=True,
                           broker_url=url).to_dict()
        finally:
            if broker is not None:
                broker.terminate()
                broker.wait(10)
        loop_s = time.monotonic() - t0
    fig = {(r["phase"], r["version"]): r for r in res["figures"]}
    before = fig.get(("before", SERVING_VERSION), {})
    under = fig.get(("shift", SERVING_VERSION), {})
    after = fig.get(("after", RETRAINED_VERSION), {})
    g = res["retrain"]["gate"]
    print(f"edgeship demo --loop{' --fast' if args.fast else ''}: {len(res['devices'])} devices, "
          f"{len(res['shifted_devices'])} shifted; broker {url or 'embedded amqtt'}; whole run {loop_s:.0f} s\n")
    print(phase_table(res["figures"]) + "\n")
    print("negative feedback           all devices   shifted devices")
    for name, r in (("before the shift (v1)", before), ("under the shift (v1)", under),
                    (f"after the rollout ({RETRAINED_VERSION})", after)):
        print(f"  {name:<28}{_pct(r.get('negative_rate')):>10}   {_pct(r.get('negative_rate_shifted')):>10}")
    print("\ntop-1 (points)              original test set   held-out field set")
    print(f"  v1 {SERVING_VERSION:<24}{g['original_serving']:>12.2f}   {g['field_serving']:>12.2f}")
    print(f"  retrained {RETRAINED_VERSION:<17}{g['original_new']:>12.2f}   {g['field_new']:>12.2f}")
    print(f"  ({g['original_samples']} original test samples, {g['field_samples']} held-out field samples from "
          f"{len(res['export']['holdout_devices'])} devices)")
    print(f"\nalarm → completed rollout: {res['alarm_to_complete_s'] / 60:.2f} min "
          f"(retrain {res['retrain']['seconds']:.0f} s, rollout {res['rollout']['seconds']:.0f} s)")
    alarms = _alarm_counts(Path(res["db_path"]), res["phases"], set(res["shifted_devices"]))
    b, u = alarms["before"], alarms["shift"]
    print(f"\ndrift alarms (windows of about {b['predictions']} predictions): calibrated / old fixed rule")
    print(f"  before the shift, all devices (false alarms)   {b['calibrated']:>3} / {b['old_rule']:>3} of {b['windows']}")
    print(f"  under the shift, shifted devices on v1         {u['calibrated']:>3} / {u['old_rule']:>3} of {u['windows']}")
    print(f"\ndrift score after the rollout ({RETRAINED_VERSION}): {_num(after.get('drift_score'))} against its own "
          f"reference (which holds the field data), {_num(after.get('drift_score_vs_previous'))} against v1's "
          f"(under the shift on v1: {_num(under.get('drift_score'))}; before it: {_num(before.get('drift_score'))})")
    curve = []
    points = [p.strip() for p in args.curve.split(",") if p.strip()]
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    if points:
        recipe = Path(res["workdir"]) / "retrain" / "recipe.toml"
        print(f"\nfield accuracy vs field samples used (distinct training samples from the export), "
              f"mean [min-max] over seeds {', '.join(map(str, seeds))}:")
        print("  used   held-out field          original test           seconds")
        for n in points:
            runs = [_curve_point(recipe, n, work, seed) for seed in seeds]
            curve.extend(runs)
            print(f"  {runs[0]['field_train_used']:>4}   {_spread([r['field_new'] for r in runs])}   "
                  f"{_spread([r['original_new'] for r in runs])}   {sum(r['seconds'] for r in runs):>7.1f}")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "loop.json").write_text(json.dumps({
        "settings": {"fast": args.fast, "devices": len(res["devices"])}, "figures": res["figures"],
        "gate": g, "export": res["export"], "alarm_to_complete_min": res["alarm_to_complete_s"] / 60,
        "rollout": res["rollout"], "curve": curve, "alarms": alarms, "loop_seconds": round(loop_s, 1)}, indent=2, default=str))
    print(f"\nwrote {OUT / 'loop.json'}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
