"""Benchmark for issue 10 (adapting to the device): variants under a latency budget, with CPU load.

    python benchmarks/adapt.py [--load-procs 6] [--load-s 20] [--rate 200] [--no-psi]

One package, three variants of a digits classifier, each with its measured
top-1 on the 400 held-out images as ``metrics.points``: a wide MLP (two
4,096-unit hidden layers) in fp32 (most accurate, slowest), the same MLP in
int8 (static, MinMax calibration) and a tiny MLP in fp32 (fastest, least
accurate). The wide MLP is there to give millisecond-scale calls, as an edge
model has; the digits CNNs take 0.03-0.3 ms, where any p95 on a shared
2-core machine is noise.

1. The agent's start-up figures are measured here first, the same way the
   agent measures them (interleaved batch-1 model calls; CPU wait probe):
   the budget is set between the int8 and fp32 estimates, and the agent must
   pick int8.
2. A client thread sends ``--rate`` requests/s on a fixed schedule and
   measures what the application sees: from each request's scheduled send
   time to its result. After a quiet phase, ``--load-procs`` busy-loop
   processes start (3 per core on 2 cores): the agent must step down within
   sustain_s + 2 checks + a swap. The load starts only once the agent runs
   its start-up choice (a busy shared machine can push the quiet phase over
   budget too: such moves are printed, and the load waits until it is back)
   or, when the agent left the start-up choice at low CPU pressure (it
   served over the budget: the start-up figures misjudged it, and the
   agent's served figure keeps it away), the variant it then holds for the
   step-up bound; the checks below then refer to that variant.
3. The load stops: the agent must step back up within headroom_s +
   cooldown_s + 2 checks + a swap, and not before: a step up decided while
   the load runs is a failure, whatever came after. The agent's CPU
   pressure figure (the step-up gate) is printed per phase; ``--no-psi``
   runs the agent as on a kernel without PSI (pressure sampled from
   ``/proc/loadavg``).

No request may fail across the swaps. Prints the timeline with each bound
and ok/MISSED; writes ``benchmarks/out/adapt.json`` and ``adapt.png``.
"""
from __future__ import annotations

import argparse
import bisect
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeship.lifecycle import Loop  # noqa: E402
from examples.digits.model import LABELS, PREPROCESS, load_digits_split, train_classifier  # noqa: E402

OUT = ROOT / "benchmarks" / "out"
SCALE = np.float32(PREPROCESS["scale"])
IDS = ("wide-fp32", "wide-int8", "tiny-fp32")


def _mlp(hidden: list[int]):
    import torch

    nn = torch.nn
    layers, width = [nn.Flatten()], 64
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, 10))


def build(work: Path) -> tuple[Path, dict]:
    from edgeship import package
    from edgeship.converters import evaluate as ev
    from edgeship.converters import quantize
    from edgeship.converters.data import load_data
    from edgeship.converters.onnx_export import export_onnx

    split = load_digits_split(0)
    wide = train_classifier(_mlp([4096, 4096]), split["x_train"], split["y_train"], epochs=3, seed=0)
    wide_onnx = export_onnx(wide, split["x_eval"][:2] * SCALE, work / "wide.onnx")["path"]
    tiny = train_classifier(_mlp([12]), split["x_train"], split["y_train"], epochs=15, seed=0)
    tiny_onnx = export_onnx(tiny, split["x_eval"][:2] * SCALE, work / "tiny.onnx")["path"]
    calib = {"input": split["x_calib"] * SCALE, "labels": split["y_calib"]}
    evald = {"input": split["x_eval"] * SCALE, "labels": split["y_eval"]}
    q = quantize(str(wide_onnx), calib, evald, method="static", calibrations=("minmax",), recovery_steps=0,
                 quiet=True, work_dir=work / "q", repeats=5)
    files = {"wide.onnx": wide_onnx, "wide.int8.onnx": q.artifacts["onnx"], "tiny.onnx": tiny_onnx}
    ed = load_data(evald)
    measured = {m: 100.0 * float(np.mean(ev.predict(p, ed).argmax(1) == split["y_eval"])) for m, p in files.items()}
    points = dict(measured)
    # The scenario needs fp32 ranked above int8 (the budget decides between them). Some builds measure the int8
    # model one or two images of 400 better than its fp32 source: quantization noise, not a better model. Such a
    # difference is recorded as a tie, which the precision breaks for fp32 (variant_accuracy); reported.
    if 0 < measured["wide.int8.onnx"] - measured["wide.onnx"] <= 0.5:
        points["wide.int8.onnx"] = measured["wide.onnx"]
    variants = [
        {"id": "wide-fp32", "file": "wide.onnx", "precision": "fp32", "metrics": {"points": points["wide.onnx"]}},
        {"id": "wide-int8", "file": "wide.int8.onnx", "precision": "int8",
         "metrics": {"points": points["wide.int8.onnx"]}},
        {"id": "tiny-fp32", "file": "tiny.onnx", "precision": "fp32", "metrics": {"points": points["tiny.onnx"]}},
    ]
    # Ties in accuracy are broken by precision then size (variant_accuracy).
    pkg = package.build(work / "digits-variants.edgepkg", {k: str(v) for k, v in files.items()}, name="digits",
                        version="1.0.0", labels=LABELS, preprocess=PREPROCESS, variants=variants,
                        example_input=(split["x_eval"][:1] * SCALE).astype(np.float32))
    ids = {v["file"]: v["id"] for v in variants}
    return pkg, {v["id"]: v["metrics"]["points"] for v in variants}, {ids[k]: v for k, v in measured.items()}


def pre_measure(pkg: Path, seconds: float, probe_ms: float) -> tuple[dict, float]:
    """The variants' model-call p95 and the CPU wait, timed the way the agent times them at start-up."""
    from edgeship.agent.adapt import measure_interleaved, probe_cpu_wait
    from edgeship.runtime import load

    runners = {vid: load(str(pkg), variant=vid, threads=1) for vid in IDS}
    try:
        x = np.asarray(runners["wide-fp32"].package.example_input(), np.float32)
        runs = {vid: (lambda f, r=r: r.run_unchecked({"input": f[0]})) for vid, r in runners.items()}
        calls = measure_interleaved(runs, {vid: [x] for vid in runners}, seconds=seconds)
    finally:
        for r in runners.values():
            r.close()
    wait = probe_cpu_wait(1.0, probe_ms / 1000.0)
    return calls, float(wait.percentile(95) or 0.0)


class Client(Loop):
    """Sends one request per 1/rate s on a fixed schedule; records (scheduled time, latency ms) per request.

    The latency is counted from the *scheduled* send time, as an application
    fed by a sensor sees it: a client thread that waits for a CPU is late.
    """

    def __init__(self, agent, x: np.ndarray, rate: float) -> None:
        super().__init__("bench-client")
        self.agent, self.x, self.rate = agent, x, rate
        self.dues: list[float] = []      # scheduled send times, ascending
        self.latencies: list[float] = []  # ms, same order
        self.errors: list[str] = []
        self.resyncs = 0

    def run(self) -> None:
        t0, n = time.monotonic(), 0
        while not self.wait(t0 + n / self.rate - time.monotonic()):
            due = t0 + n / self.rate
            n += 1
            try:
                self.agent.infer(self.x, timeout=30)
                self.latencies.append((time.monotonic() - due) * 1000.0)
                self.dues.append(due)
            except Exception as exc:  # noqa: BLE001 - counted: the benchmark reports every failure
                self.errors.append(f"{type(exc).__name__}: {exc}")
            if time.monotonic() - due > 1.0:  # more than 1 s behind: start a new schedule, do not burst
                t0, n = time.monotonic(), 0
                self.resyncs += 1

    def p95(self, start: float, end: float) -> float | None:
        # bisect, not a scan: this runs every 0.25 s, and a Python loop over all records would hold the
        # GIL for milliseconds; descheduled under the load while holding it, it would stall the client.
        a, b = bisect.bisect_left(self.dues, start), bisect.bisect_left(self.dues, end)
        return float(np.percentile(self.latencies[a:b], 95)) if b > a else None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--load-procs", type=int, default=3 * (os.cpu_count() or 2))
    ap.add_argument("--rate", type=float, default=200.0, help="client requests per second")
    ap.add_argument("--check", type=float, default=0.5)
    ap.add_argument("--sustain", type=float, default=3.0)
    # 10 s (the default config has 30 s): a step up needs room, CPU pressure included, in 90 % of the checks
    # of this window, so it comes ~0.9 x this after the load stops.
    ap.add_argument("--headroom-s", type=float, default=10.0)
    ap.add_argument("--probe-ms", type=float, default=5.0)
    ap.add_argument("--no-psi", action="store_true",
                    help="act as a kernel without PSI: CPU pressure sampled from /proc/loadavg")
    ap.add_argument("--quiet-s", type=float, default=8.0, help="phase 1 length")
    ap.add_argument("--budget-at", type=float, default=0.6,
                    help="budget = int8 estimate + this x (fp32 estimate - int8 estimate)")
    ap.add_argument("--load-s", type=float, default=20.0, help="how long the CPU load runs")
    ap.add_argument("--max-after-s", type=float, default=40.0)
    args = ap.parse_args(argv)

    from edgeship.agent import Agent
    from edgeship.agent.adapt import AdaptController
    from edgeship.agent.config import parse_config
    from edgeship.agent.telemetry import hist_delta
    from edgeship.metrics import Histogram

    t_bench = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pkg, points, points_measured = build(work)
        pre, pre_wait = pre_measure(pkg, 3.0, args.probe_ms)
        est = {vid: pre[vid]["p95"] + pre_wait for vid in IDS}
        lo, hi = est["wide-int8"], est["wide-fp32"]
        budget = float(lo + args.budget_at * (hi - lo))
        cfg = parse_config({"agent": {"allow_unsigned": True, "package": str(pkg), "state_dir": str(work / "state")},
                            # max_delay 0: answer at once (the API caller runs the batch when the runner is free)
                            "runtime": {"threads": 1}, "batcher": {"max_batch": 8, "max_delay_ms": 0.0},
                            "adapt": {"latency_budget_ms": budget}})
        timeline: list[dict] = []
        procs: list[subprocess.Popen] = []
        marks: dict[str, float] = {}
        with Agent(cfg) as agent:
            ctl = AdaptController(agent, check_s=args.check, sustain_s=args.sustain, headroom_s=args.headroom_s,
                                  cooldown_s=args.sustain, headroom=1.0, measure_s=1.0, tune=False, min_samples=20,
                                  probe_ms=args.probe_ms,
                                  **({"psi_path": work / "no-psi"} if args.no_psi else {}))
            agent.add_component(ctl)
            start_choice = agent.handle.variant
            x = (load_digits_split(0)["x_eval"][0]).astype(np.float32)  # raw pixels: the agent preprocesses
            client = Client(agent, x, args.rate).start()
            t0 = time.monotonic()
            prev_calls = [agent.metrics.snapshot()["inference_ms"]]

            def sample(phase: str) -> None:
                last = dict(ctl.last)
                now = time.monotonic()
                calls = agent.metrics.snapshot()["inference_ms"]
                d = hist_delta(calls, prev_calls[0])
                prev_calls[0] = calls
                h = Histogram.from_dict(d) if d else None
                timeline.append({"t": round(now - t0, 2), "phase": phase, "variant": agent.handle.variant,
                                 "estimate_ms": last.get("p95_ms"), "request_ms": last.get("request_p95_ms"),
                                 "cpu_wait_ms": last.get("cpu_wait_p95_ms"), "pressure": last.get("cpu_pressure"),
                                 "call_ms": h.percentile(95) if h is not None and h.count else None,
                                 "app_ms": client.p95(now - 0.5, now)})

            def run_for(phase: str, seconds: float, until=None) -> float | None:
                start = time.monotonic()
                while time.monotonic() - start < seconds:
                    sample(phase)
                    if until is not None and until():
                        return time.monotonic()
                    time.sleep(0.25)
                return None

            run_for("quiet", args.quiet_s)

            def held(seconds: float, variant: str | None = None) -> bool:
                v = agent.handle.variant if variant is None else variant
                return agent.handle.variant == v and all(r["variant"] == v for r in timeline[-int(seconds / 0.25):])

            def abandoned() -> bool:
                # The agent stepped down from its start-up choice at low CPU pressure: it served over the budget,
                # and the served figure keeps the agent from returning to it (AdaptPolicy). Nothing to wait for.
                return any(c["action"] == "down" and c["from_id"] == start_choice and
                           (c.get("cpu_pressure") is None or c["cpu_pressure"] <= ctl.pressure_max)
                           for c in list(ctl._events))  # noqa: SLF001

            # Start the load on the variant the agent settled on: the start-up choice, held for a few checks (the
            # machine is shared: a move caused by others' work waits until the agent is back), or, when the agent
            # abandoned it, the variant it then held for as long as a step back up may take.
            up_decide = args.headroom_s + args.sustain + 2 * args.check
            settled = lambda: held(2.0, start_choice) or (abandoned() and held(up_decide))  # noqa: E731
            if not settled():
                run_for("quiet", args.max_after_s + up_decide, settled)
            quiet_moves = [c for c in ctl._events if c["action"] != "start"]  # noqa: SLF001
            quiet_variant = agent.handle.variant
            marks["load_start"] = time.monotonic()
            wall = {"load_start": time.time()}
            procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load_procs)]
            try:
                down_at = run_for("load", args.load_s, lambda: agent.handle.variant != quiet_variant)
                loaded_variant = agent.handle.variant
                run_for("load", max(0.0, args.load_s - (time.monotonic() - marks["load_start"])))
            finally:
                for p in procs:
                    p.kill()
                for p in procs:
                    p.wait(timeout=10)
            marks["load_stop"] = time.monotonic()
            wall["load_stop"] = time.time()
            up_at = run_for("after", args.max_after_s, lambda: agent.handle.variant == quiet_variant)
            run_for("after", 5.0)
            stayed = agent.handle.variant == quiet_variant
            marks["end"] = time.monotonic()
            client.stop(10.0)  # a request may wait for a CPU under the load
            changes = list(ctl._events)  # noqa: SLF001 - the benchmark reads the full change log
            # What the application saw in the 2 s after each change took effect (client times are monotonic).
            offset = time.time() - time.monotonic()
            for c in changes:
                c["app_p95_next_2s_ms"] = client.p95(c["at"] - offset, c["at"] - offset + 2.0)
            measurements = dict(ctl.measurements)
            served_figures = ctl.health()["adapt"]["served_p95_ms"]
            outlook = ctl.last.get("up_outlook")
            base_ms = ctl.base_ms
            pressure_source = ctl.health()["adapt"]["pressure_source"]
            pressure_max = ctl.pressure_max
            served = len(client.latencies)
            errors = list(client.errors)
            phases = {}
            split = min(down_at, marks["load_stop"]) if down_at is not None else marks["load_stop"]
            for name, a, b in (("quiet", t0, marks["load_start"]), ("load", marks["load_start"], split),
                               ("load, down", split, marks["load_stop"]), ("after", marks["load_stop"], marks["end"])):
                if b - a < 0.25:
                    continue
                rows = [r for r in timeline if a - t0 <= r["t"] < b - t0]

                def med(k: str, rows=rows) -> float | None:
                    v = [r[k] for r in rows if r[k] is not None]
                    return float(np.median(v)) if v else None
                phases[name] = {"seconds": round(b - a, 1), "app_p95_ms": client.p95(a, b),
                                "estimate_ms": med("estimate_ms"), "request_ms": med("request_ms"),
                                "cpu_wait_ms": med("cpu_wait_ms"), "call_ms": med("call_ms"),
                                "pressure": med("pressure"),
                                "variants": sorted({r["variant"] for r in rows}, key=IDS.index)}

    bound_down = args.sustain + 2 * args.check + 1.0
    bound_up = args.headroom_s + args.sustain + 2 * args.check + 1.0  # headroom + cooldown + checks + swap
    t_down = None if down_at is None else down_at - marks["load_start"]
    t_up = None if up_at is None else up_at - marks["load_stop"]
    # A step up decided while the load ran is a failure whatever came after (the issue: back up *after* it stops).
    ups_in_load = [c for c in changes if c["action"] == "up"
                   and wall["load_start"] <= c.get("decided_at", c["at"]) < wall["load_stop"]]
    result = {
        "points": points, "points_measured": points_measured,
        "pre_measured_call_p95_ms": {k: v["p95"] for k, v in pre.items()},
        "pre_cpu_wait_p95_ms": pre_wait, "pre_estimate_ms": est, "budget_ms": budget,
        "agent_call_p95_ms": {k: v.get("p95") for k, v in measurements.items()}, "agent_base_ms": base_ms,
        "start_choice": start_choice, "picked_int8": start_choice == "wide-int8", "quiet_variant": quiet_variant,
        "served_p95_ms": served_figures, "up_outlook_at_end": outlook,
        "under_load": loaded_variant, "t_down_s": t_down, "bound_down_s": bound_down,
        "ups_during_load": len(ups_in_load), "pressure_source": pressure_source,
        "pressure_max": pressure_max,
        "t_up_s": t_up, "bound_up_s": bound_up, "stayed_up": stayed, "wall": wall,
        "quiet_moves": quiet_moves,
        "requests": served, "failed_requests": len(errors), "errors": errors[:5], "client_resyncs": client.resyncs,
        "phases": phases, "changes": changes, "timeline": timeline, "load_procs": args.load_procs,
        "rate": args.rate, "seconds": round(time.monotonic() - t_bench, 1),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "adapt.json").write_text(json.dumps(result, indent=1, default=str))
    plot(result, OUT / "adapt.png")
    report(result, args)
    return result


def _ok(good: bool) -> str:
    return "ok" if good else "MISSED"


def _ms(v: float | None) -> str:
    return "     -  " if v is None else f"{v:8.3f}"


def report(r: dict, args) -> None:
    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the end")
    print("variant      top-1 pt  start-up model-call p95 ms (interleaved, 1 thread)  + CPU wait = estimate")
    for vid in IDS:
        print(f"{vid:<12} {r['points'][vid]:>8.2f}  {r['pre_measured_call_p95_ms'][vid]:>10.3f}"
              f"{'':>40}{r['pre_cpu_wait_p95_ms']:>6.3f} {r['pre_estimate_ms'][vid]:>8.3f}")
    print(f"budget {r['budget_ms']:.3f} ms = int8 estimate + {args.budget_at:g} x (fp32 - int8); the budget is the "
          f"request p95 the application sees")
    agent = ", ".join(f"{k} {v:.3f}" for k, v in r["agent_call_p95_ms"].items() if v is not None)
    print(f"agent's own start-up model-call p95 (ms): {agent}; "
          f"base (CPU wait + batch delay) {r['agent_base_ms']:.3f} ms")
    start = next((c for c in r["changes"] if c["action"] == "start"), {})
    print(f"[{_ok(r['picked_int8'])}] start-up choice: {r['start_choice']} (target wide-int8): {start.get('reason')}")
    pm = r["points_measured"]
    if pm != r["points"]:
        print(f"     note: int8 measured {pm['wide-int8']:.2f} pt, fp32 {pm['wide-fp32']:.2f} pt (within 2 images of "
              f"400): recorded as a tie, so fp32 ranks first as the scenario needs (see build)")
    if r["points"]["wide-int8"] > r["points"]["wide-fp32"]:
        print("     note: int8 measured more accurate than fp32 in this build: int8 is the top variant and fp32 is "
              "never worth running, so this check does not test the budget")
    print(f"client: {r['rate']:g} requests/s on a schedule; latency from the scheduled send time to the result")
    print(f"CPU pressure (share of the time tasks waited for a CPU) from {r['pressure_source']}; "
          f"no step up above {r['pressure_max']:.0%}")
    print("phase        secs  variants             app p95  agent estimate = requests + CPU wait  model call  "
          "CPU pressure (p95 ms; agent figures: median of checks)")
    for name, ph in r["phases"].items():
        press = "     -" if ph.get("pressure") is None else f"{ph['pressure']:6.0%}"
        print(f"{name:<11} {ph['seconds']:>5.1f}  {','.join(ph['variants']):<20} {_ms(ph['app_p95_ms'])}  "
              f"{_ms(ph['estimate_ms'])}   = {_ms(ph['request_ms'])} + {_ms(ph['cpu_wait_ms'])}          "
              f"{_ms(ph['call_ms'])}  {press}")
    later = r["changes"][1 + len(r["quiet_moves"]):]  # the moves from the load on
    down = next((c for c in later if c["action"] == "down"), None)
    up = next((c for c in reversed(later) if c["action"] == "up"), None)
    qm = r["quiet_moves"]
    print(f"quiet phase: {len(qm)} move(s) before the load"
          + ("".join(f"\n  {c['action']} {c['from_id']} -> {c['to_id']}: {c['reason']}" for c in qm) if qm else "")
          + ("" if r["quiet_variant"] == r["start_choice"] else
             f"\n  the load starts on {r['quiet_variant']}: the agent left {r['start_choice']} while quiet and "
             f"did not return to it"))
    print(f"t={r['phases']['quiet']['seconds']:.1f} s: CPU load started: {r['load_procs']} busy-loop processes "
          f"for {args.load_s:g} s")
    wall = r["wall"]

    def move(c: dict | None, since: float, bound_decide: float, bound_txt: str, what: str) -> float | None:
        if c is None:
            print(f"[MISSED] {what}: never (decision bound {bound_decide:.1f} s = {bound_txt})")
            return None
        decided, serving = c["decided_at"] - since, c["at"] - since
        print(f"[{_ok(decided <= bound_decide)}] {what}: decided {decided:.1f} s after "
              f"(bound {bound_decide:.1f} s = "
              f"{bound_txt}): {c['from_id']} -> {c['to_id']}: {c['reason']}")
        how = ("kept loaded and warm as the standby" if c.get("standby") else
               f"verify + load + warm {c['to_id']} beside the running variant")
        print(f"     swap {c['swap_s']:.2f} s ({how}) -> serving {c['to_id']} {serving:.1f} s after")
        nxt = c.get("app_p95_next_2s_ms")
        if c["action"] == "up":  # was it right? the application's latency on the better variant
            print(f"[{_ok(nxt is not None and nxt <= r['budget_ms'])}] app p95 in the 2 s on {c['to_id']}: "
                  f"{_ms(nxt).strip()} ms (budget {r['budget_ms']:.3f} ms)"
                  + ("; decided before the load stopped: the estimate had room in 90 % of the checks of the last "
                     f"{args.headroom_s:g} s" if decided < 0 else ""))
        else:
            print(f"     app p95 in the 2 s on {c['to_id']}: {_ms(nxt).strip()} ms")
        return serving

    t_down = move(down, wall["load_start"], args.sustain + 2 * args.check,
                  f"sustain {args.sustain:g} + 2 checks x {args.check:g}", "step down after the load started")
    print(f"t={sum(v['seconds'] for k, v in r['phases'].items() if k != 'after'):.1f} s: CPU load stopped")
    t_up = move(up, wall["load_stop"], args.headroom_s + args.sustain + 2 * args.check,
                f"headroom {args.headroom_s:g} + cooldown {args.sustain:g} + 2 checks x {args.check:g}",
                "step back up after the load stopped") if down is not None else None
    swap_allow = 1.0
    print(f"[{_ok(t_down is not None and t_down <= r['bound_down_s'])}] on a faster variant "
          f"{'never' if t_down is None else f'{t_down:.1f} s'} after the load started, swap included "
          f"(bound {r['bound_down_s']:.1f} s = decision bound + {swap_allow:g} s swap)")
    print(f"[{_ok(t_up is not None and t_up <= r['bound_up_s'])}] back on {r['quiet_variant']} "
          f"{'never' if t_up is None else f'{t_up:.1f} s'} after the load stopped, swap included "
          f"(bound {r['bound_up_s']:.1f} s = decision bound + {swap_allow:g} s swap)")
    print(f"[{_ok(r['ups_during_load'] == 0)}] step ups decided while the load ran: {r['ups_during_load']} (bound 0)")
    print(f"[{_ok(r['stayed_up'])}] still on {r['quiet_variant']} 5 s later: {r['stayed_up']}")
    print(f"[{_ok(r['failed_requests'] == 0)}] requests failed {r['failed_requests']} of {r['requests']} (bound 0)"
          + (f"; first: {r['errors'][0]}" if r["errors"] else ""))
    ups = [c for c in r["changes"] if c["action"] == "up"]
    wrong = [c for c in ups if c.get("app_p95_next_2s_ms") is None or c["app_p95_next_2s_ms"] > r["budget_ms"]]
    print(f"[{_ok(not wrong)}] every step up kept the app within the budget for the next 2 s: "
          f"{len(ups) - len(wrong)} of {len(ups)}")
    served = ", ".join(f"{k} {v:.3f}" for k, v in r["served_p95_ms"].items())
    o = r.get("up_outlook_at_end") or {}
    print(f"served figures (the agent's request p95 on each variant at low CPU pressure, ms): {served or '-'}"
          + (f"; next step up at the end: {o['to_id']} expected {o['start_up_ms']:.3f} ms from start-up figures, "
             f"served {'-' if o['served_ms'] is None else format(o['served_ms'], '.3f')} ms, "
             f"{'fits' if o['fits'] else 'does not fit'}" if o else ""))
    print("all changes (s from the load start; app p95 in the 2 s after):")
    for c in r["changes"]:
        print(f"  {c['action']:>5} {c.get('from_id')} -> {c['to_id']} at {c['at'] - wall['load_start']:6.1f} s, "
              f"app p95 {_ms(c.get('app_p95_next_2s_ms')).strip()} ms")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = result["timeline"]
    ids = list(reversed(IDS))
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    ts = [r["t"] for r in tl]

    def col(k):
        return [r[k] if r[k] is not None else np.nan for r in tl]

    a1.plot(ts, col("app_ms"), label="client: scheduled send -> result (p95, 0.5 s)")
    a1.plot(ts, col("estimate_ms"), label="agent estimate: requests + CPU wait (p95)")
    a1.plot(ts, col("call_ms"), label="model call (p95)", alpha=0.6)
    a1.axhline(result["budget_ms"], color="tab:red", linestyle="--", label="budget")
    a1.set_yscale("log")
    a1.set_ylabel("ms")
    a1.legend(fontsize=7, loc="lower left")
    a3 = a1.twinx()  # the step-up gate: CPU pressure against its limit
    a3.plot(ts, col("pressure"), color="tab:gray", linestyle=":", label="CPU pressure (share of time)")
    a3.axhline(result["pressure_max"], color="tab:gray", linewidth=0.8)
    a3.set_ylim(0, 1.05)
    a3.set_ylabel("CPU pressure")
    a3.legend(fontsize=7, loc="upper right")
    a2.step(ts, [ids.index(r["variant"]) if r["variant"] in ids else -1 for r in tl], where="post")
    a2.set_yticks(range(len(ids)), ids)
    a2.set_xlabel("seconds")
    for ax in (a1, a2):
        load = [r["t"] for r in tl if r["phase"] == "load"]
        if load:
            ax.axvspan(min(load), max(load), color="tab:orange", alpha=0.15)
        ax.grid(True, alpha=0.3)
    a1.set_title("adapting to CPU load (shaded): latency and variant over time")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
