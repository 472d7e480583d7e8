"""The micro-batching policy and packer, tested without threads or models; plus the pure metrics."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from waiting import wait_until

from edgeship.agent.batcher import ACCEPTED, REJECTED, WAIT, BatchPolicy, MicroBatcher, Packer, Work
from edgeship.agent.cache import ResultCache, input_key, row_keys
from edgeship.agent.prefetch import backoff_delay
from edgeship.errors import OverloadError
from edgeship.metrics import BATCH_BOUNDS, LATENCY_BOUNDS_MS, Counters, Histogram, percentiles


def w(n=1, t=0.0, deadline=None, source="s"):
    return Work([np.arange(n, dtype=np.float32)[:, None]], n, t_in=t, deadline=deadline, source=source)


def test_flush_when_full_and_after_max_delay():
    p = BatchPolicy(max_batch=4, max_delay_s=0.010, queue_size=100)
    assert p.next_flush(0.0) is None
    p.offer(w(1, t=0.0), 0.0)
    assert p.next_flush(0.0) == pytest.approx(0.010)
    assert p.next_flush(0.004) == pytest.approx(0.006)
    for _ in range(3):
        p.offer(w(1, t=0.001), 0.001)
    assert p.next_flush(0.001) == 0.0  # full
    segs = p.take(0.001)
    assert [s.count for s in segs] == [1, 1, 1, 1] and [s.pos for s in segs] == [0, 1, 2, 3]
    assert p.counts["flush_full"] == 1 and p.pending == 0
    p.offer(w(1, t=1.0), 1.0)
    assert p.next_flush(1.011) == 0.0
    p.take(1.011)
    assert p.counts["flush_delay"] == 1


def test_deadline_flushes_early_accounting_for_run_time():
    p = BatchPolicy(max_batch=32, max_delay_s=0.050, queue_size=100, margin_s=0.001)
    p.observe_run(0.004)
    p.offer(w(1, t=0.0), 0.0)
    p.offer(w(1, t=0.0, deadline=0.010), 0.0)
    # must start by 0.010 - 0.004 - 0.001 = 0.005, long before max_delay (0.050)
    assert p.next_flush(0.0) == pytest.approx(0.005)
    assert p.flush_reason(0.006) == "flush_deadline"
    segs = p.take(0.006)
    assert sum(s.count for s in segs) == 2 and p.counts["flush_deadline"] == 1
    # the deadline heap forgets served work
    p.offer(w(1, t=0.01), 0.01)
    assert p.next_flush(0.01) == pytest.approx(0.050)


def test_blocks_split_across_batches_in_order():
    p = BatchPolicy(max_batch=4, max_delay_s=0.0, queue_size=100)
    a, b = w(6), w(3)
    p.offer(a, 0.0)
    p.offer(b, 0.0)
    s1 = p.take(0.0)
    assert [(s.work is a, s.start, s.count, s.pos) for s in s1] == [(True, 0, 4, 0)]
    s2 = p.take(0.0)
    assert [(s.work is a, s.start, s.count, s.pos) for s in s2] == [(True, 4, 2, 0), (False, 0, 2, 2)]
    s3 = p.take(0.0)
    assert [(s.work is b, s.start, s.count) for s in s3] == [(True, 2, 1)]
    assert p.counts["taken"] == 9 and p.pending == 0 and a.done and b.done


def test_overload_reject_counts_exactly():
    p = BatchPolicy(max_batch=8, queue_size=10, overload="reject")
    decisions = [p.offer(w(1), 0.0).decision for _ in range(25)]
    assert decisions.count(ACCEPTED) == 10 and decisions.count(REJECTED) == 15
    assert p.counts["accepted"] == 10 and p.counts["rejected"] == 15 and p.pending == 10


def test_overload_block_asks_to_wait_and_refuse_counts():
    p = BatchPolicy(max_batch=8, queue_size=2, overload="block")
    p.offer(w(1), 0.0)
    p.offer(w(1), 0.0)
    item = w(1)
    assert p.offer(item, 0.0).decision == WAIT
    assert p.counts["rejected"] == 0  # waiting is not a refusal yet
    p.refuse(item)
    assert p.counts["rejected"] == 1 and p.pending == 2


def test_overload_drop_oldest_evicts_oldest_rows_exactly():
    p = BatchPolicy(max_batch=8, queue_size=10, overload="drop_oldest")
    first, second = w(6), w(4)
    p.offer(first, 0.0)
    p.offer(second, 0.0)
    offer = p.offer(w(3), 0.0)
    assert offer.decision == ACCEPTED
    assert [(x is first, k) for x, k in offer.evicted] == [(True, 3)]
    assert first.start == 3 and first.dropped == 3 and p.pending == 10
    offer = p.offer(w(5), 0.0)
    assert [(x is first, k) for x, k in offer.evicted] == [(True, 3), (False, 2)]
    assert first.done and p.counts["dropped"] == 8
    # conservation: accepted = pending + dropped + taken
    p.take(0.0)
    c = p.counts
    assert c["accepted"] == p.pending + c["dropped"] + c["taken"] == 18


def test_oversized_work_is_refused_with_reason():
    p = BatchPolicy(max_batch=4, queue_size=5, overload="drop_oldest")
    offer = p.offer(w(6), 0.0)
    assert offer.decision == REJECTED and "exceed" in offer.reason and p.counts["rejected"] == 6


def test_drain_all_counts_dropped():
    p = BatchPolicy(max_batch=4, queue_size=50)
    p.offer(w(5), 0.0)
    p.take(0.0)
    left = p.drain_all()
    assert len(left) == 1 and p.counts["dropped"] == 1 and p.pending == 0


# -- packer -----------------------------------------------------------------------

def _segments(p: BatchPolicy):
    return p.take(0.0)


def test_packer_dynamic_batch_keeps_order():
    p = BatchPolicy(max_batch=8, queue_size=100)
    rows = [np.full((2, 3), i, np.float32) for i in range(4)]
    for r in rows:
        p.offer(Work([r], 2, t_in=0.0), 0.0)
    pk = Packer([(3,)], [np.float32], 8)
    segs = _segments(p)
    n = pk.pack(segs)
    assert n == 8
    calls = []
    out = pk.run(lambda arrs: calls.append(arrs[0].shape) or [arrs[0].sum(axis=1)], n)
    assert calls == [(8, 3)]
    assert out[0].tolist() == [0, 0, 3, 3, 6, 6, 9, 9]


def test_packer_fixed_batch_pads_and_splits():
    pk = Packer([(2,)], [np.float32], max_batch=10, model_batch=4)
    assert pk.capacity == 12
    p = BatchPolicy(max_batch=10, queue_size=100)
    p.offer(Work([np.arange(20, dtype=np.float32).reshape(10, 2)], 10, t_in=0.0), 0.0)
    n = pk.pack(p.take(0.0))
    shapes = []
    out = pk.run(lambda arrs: shapes.append(arrs[0].shape) or [arrs[0][:, :1] * 2], n)
    assert shapes == [(4, 2), (4, 2), (4, 2)]
    assert out[0].shape == (10, 1) and out[0][:, 0].tolist() == [2 * 2 * i for i in range(10)]


def test_packer_no_batch_axis_runs_one_by_one():
    pk = Packer([(3,)], [np.float32], max_batch=1, model_batch=0)
    p = BatchPolicy(max_batch=1, queue_size=10)
    p.offer(Work([np.ones((1, 3), np.float32)], 1, t_in=0.0), 0.0)
    n = pk.pack(p.take(0.0))
    shapes = []
    out = pk.run(lambda arrs: shapes.append(arrs[0].shape) or [arrs[0].sum(keepdims=True)], n)
    assert shapes == [(3,)] and out[0].tolist() == [[3.0]]


def test_packer_buffers_are_reused():
    pk = Packer([(4,)], [np.float32], 8)
    buf = pk.buffers[0]
    for _ in range(3):
        p = BatchPolicy(max_batch=8, queue_size=10)
        p.offer(Work([np.ones((3, 4), np.float32)], 3, t_in=0.0), 0.0)
        pk.pack(p.take(0.0))
        assert pk.buffers[0] is buf


# -- the threaded batcher ------------------------------------------------------

def test_microbatcher_runs_and_stops_with_reject_policy():
    seen = []
    done = threading.Event()

    def process(segs):
        seen.append(sum(s.count for s in segs))
        if sum(seen) >= 5:
            done.set()

    mb = MicroBatcher(BatchPolicy(max_batch=4, max_delay_s=0.001, queue_size=8, overload="reject"), process).start()
    for _ in range(5):
        mb.put(w(1, t=0.0))
    assert done.wait(5)
    assert sum(seen) == 5 and max(seen) <= 4
    assert mb.stop(2.0) == 0
    with pytest.raises(OverloadError, match="stopping"):
        mb.put(w(1))


def test_microbatcher_block_policy_times_out_and_counts():
    gate = threading.Event()
    mb = MicroBatcher(BatchPolicy(max_batch=1, max_delay_s=0.0, queue_size=1, overload="block"),
                      lambda segs: gate.wait(5), block_timeout_s=0.05).start()
    mb.put(w(1))          # taken by the thread, which blocks on the gate
    mb.put(w(1))          # fills the queue
    with pytest.raises(OverloadError, match="waited"):
        # the first may have been taken already; at most one more fits
        mb.put(w(1))
        mb.put(w(1))
    assert mb.policy.counts["rejected"] == 1
    gate.set()
    mb.stop(2.0)


def _fut_work(n=1, t=None):
    import concurrent.futures

    return Work([np.zeros((n, 2), np.float32)], n, t_in=time.monotonic() if t is None else t,
                future=concurrent.futures.Future())


def test_inline_put_runs_on_the_callers_thread_when_the_runner_is_free():
    threads = []

    def process(segs):
        threads.append(threading.get_ident())
        for s in segs:
            s.work.future.set_result(s.count)

    mb = MicroBatcher(BatchPolicy(max_batch=8, max_delay_s=0.0), process).start()
    try:
        work = _fut_work()
        mb.put(work, inline=True)
        assert work.future.done() and work.future.result() == 1  # resolved before put returned
        assert threads == [threading.get_ident()] and mb.inline_batches == 1
        # Without inline (a source's reader) the batcher thread runs it.
        other = _fut_work()
        mb.put(other)
        assert other.future.result(5) == 1 and threads[-1] != threading.get_ident()
    finally:
        mb.stop(2.0)


def test_inline_put_waits_for_a_fuller_batch_when_max_delay_is_set():
    ran = threading.Event()
    sizes = []

    def process(segs):
        sizes.append(sum(s.count for s in segs))
        for s in segs:
            s.work.future.set_result(True)
        ran.set()

    mb = MicroBatcher(BatchPolicy(max_batch=8, max_delay_s=0.05), process).start()
    try:
        works = [_fut_work() for _ in range(3)]
        for x in works:
            mb.put(x, inline=True)
        assert not any(x.future.done() for x in works)  # nothing due yet: queued, not run inline
        assert all(x.future.result(5) for x in works) and sizes == [3] and mb.inline_batches == 0
    finally:
        mb.stop(2.0)


def test_one_batch_at_a_time_across_inline_callers_and_the_thread():
    lock = threading.Lock()
    state = {"running": 0, "max": 0, "rows": 0}

    def process(segs):
        with lock:
            state["running"] += 1
            state["max"] = max(state["max"], state["running"])
        time.sleep(0.0005)  # a model call: long enough for the other producers to pile up
        with lock:
            state["running"] -= 1
            state["rows"] += sum(s.count for s in segs)
        for s in segs:
            s.work.future.set_result(True)

    mb = MicroBatcher(BatchPolicy(max_batch=4, max_delay_s=0.0, queue_size=10_000), process).start()
    works: list = []

    def producer():
        mine = [_fut_work() for _ in range(300)]
        for x in mine:
            mb.put(x, inline=True)
        works.extend(mine)

    try:
        ts = [threading.Thread(target=producer) for _ in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(30)
        assert all(x.future.result(10) for x in works)
    finally:
        mb.stop(2.0)
    assert state["max"] == 1 and state["rows"] == 1200 == mb.policy.counts["taken"]
    # Both paths were used: callers ran batches and queued work went to the thread.
    assert 0 < mb.inline_batches < mb.policy.counts["batches"]


def test_no_inline_runs_right_after_requests_overlapped():
    gate, entered = threading.Event(), threading.Event()
    runs = []

    def process(segs):
        runs.append(threading.get_ident())
        entered.set()
        gate.wait(5)
        for s in segs:
            s.work.future.set_result(True)

    mb = MicroBatcher(BatchPolicy(max_batch=8, max_delay_s=0.0), process).start()
    mb.inline_quiet_s = 1.0  # long enough that a loaded CI machine still puts the third one inside it
    try:
        first = _fut_work()
        t = threading.Thread(target=mb.put, args=(first,), kwargs={"inline": True})
        t.start()
        assert entered.wait(5)
        second = _fut_work()
        mb.put(second, inline=True)  # meets a busy runner: overlap noted, queued
        gate.set()
        t.join(5)
        assert first.future.result(5) and second.future.result(5)
        third = _fut_work()
        t_put = time.monotonic()
        mb.put(third, inline=True)  # alone, but within the quiet window: the batcher thread runs it
        assert third.future.result(5) and runs[-1] == mb._thread.ident
        deadline = time.monotonic() + 5
        while time.monotonic() - t_put <= mb.inline_quiet_s + 0.05 and time.monotonic() < deadline:
            time.sleep(0.01)  # wait out the window
        fourth = _fut_work()
        mb.put(fourth, inline=True)
        assert fourth.future.done() and runs[-1] == threading.get_ident()
    finally:
        gate.set()
        mb.stop(2.0)


def test_stop_waits_for_an_inline_batch_to_finish():
    entered, release = threading.Event(), threading.Event()
    finished = []

    def process(segs):
        entered.set()
        release.wait(5)
        finished.append(True)
        for s in segs:
            s.work.future.set_result(True)

    mb = MicroBatcher(BatchPolicy(max_batch=1, max_delay_s=0.0), process).start()
    t = threading.Thread(target=mb.put, args=(_fut_work(),), kwargs={"inline": True})
    t.start()
    assert entered.wait(5) and mb.busy
    stopper = threading.Thread(target=mb.stop, args=(2.0,))
    stopper.start()
    stopper.join(0.2)
    assert stopper.is_alive()  # still waiting for the caller's batch
    release.set()
    stopper.join(5)
    t.join(5)
    assert finished == [True] and not mb.busy



def _pipelined(gate: threading.Event, ran: list, delivered: list, slow_first: bool = True):
    """A process step that returns a finish step; batch 0's delivery waits for ``gate``."""
    def process(segs):
        k = segs[0].work.extra
        ran.append(k)

        def finish():
            if k == 0 and slow_first:
                gate.wait(5)  # a slow sink
            delivered.append((k, threading.current_thread().name))
            for s in segs:
                s.work.future.set_result(k)
        return finish
    return process


def _tagged(i):
    x = _fut_work()
    x.extra = i
    return x


def _wait_until(fn, timeout=5.0):
    return wait_until(fn, timeout, step=0.005)


def test_the_next_batch_runs_while_the_last_is_delivered_in_order_with_bounded_backlog():
    gate, ran, delivered = threading.Event(), [], []
    mb = MicroBatcher(BatchPolicy(max_batch=1, max_delay_s=0.0), _pipelined(gate, ran, delivered),
                      max_deliveries=2, pipeline=True).start()
    try:
        works = [_tagged(i) for i in range(6)]
        for x in works:
            mb.put(x)
        # Batch 0's delivery is held; the runner still ran 1 and 2 (queued for delivery)
        # and 3, then waits for room: a slow sink slows the runner, results never pile up.
        assert _wait_until(lambda: ran == [0, 1, 2, 3])
        time.sleep(0.1)
        assert ran == [0, 1, 2, 3] and not any(x.future.done() for x in works) and mb.busy
        assert not mb.wait_idle(0.05)
        gate.set()
        assert [x.future.result(5) for x in works] == list(range(6))
        assert [k for k, _ in delivered] == list(range(6))
        assert {name for _, name in delivered} == {"edgeship-batcher-deliver"}
        assert mb.wait_idle(5) and not mb.busy
    finally:
        gate.set()
        mb.stop(2.0)


def test_an_inline_request_does_not_overtake_a_pending_delivery():
    gate, ran, delivered = threading.Event(), [], []
    mb = MicroBatcher(BatchPolicy(max_batch=8, max_delay_s=0.0), _pipelined(gate, ran, delivered),
                      pipeline=True).start()
    mb.inline_quiet_s = 0.0
    try:
        first = _tagged(0)
        mb.put(first)
        assert _wait_until(lambda: ran == [0])
        second = _tagged(1)
        mb.put(second, inline=True)  # runner free, queue empty, but batch 0 is not delivered yet
        assert not second.future.done() and mb.inline_batches == 0
        gate.set()
        assert second.future.result(5) == 1 and [k for k, _ in delivered] == [0, 1]
        # Once everything is delivered, a lone request runs inline again.
        assert mb.wait_idle(5)
        third = _tagged(2)
        mb.put(third, inline=True)
        assert third.future.done() and mb.inline_batches == 1 and delivered[-1][1] == threading.current_thread().name
    finally:
        gate.set()
        mb.stop(2.0)


def test_stop_delivers_every_batch_that_already_ran():
    gate, ran, delivered = threading.Event(), [], []
    mb = MicroBatcher(BatchPolicy(max_batch=1, max_delay_s=0.0), _pipelined(gate, ran, delivered),
                      pipeline=True).start()
    works = [_tagged(i) for i in range(3)]
    for x in works:
        mb.put(x)
    assert _wait_until(lambda: len(ran) == 3)
    stopper = threading.Thread(target=mb.stop, args=(3.0,))
    stopper.start()
    stopper.join(0.2)
    assert stopper.is_alive()  # waiting for the held delivery, not failing it
    gate.set()
    stopper.join(5)
    assert not stopper.is_alive()
    assert [x.future.result(0) for x in works] == [0, 1, 2]


def test_a_failing_finish_step_fails_only_its_batch():
    errors = []

    def process(segs):
        k = segs[0].work.extra

        def finish():
            if k == 1:
                raise RuntimeError("sink exploded")
            for s in segs:
                s.work.future.set_result(k)
        return finish

    mb = MicroBatcher(BatchPolicy(max_batch=1, max_delay_s=0.0), process, pipeline=True,
                      on_error=lambda segs, exc: errors.append(str(exc))).start()
    try:
        works = [_tagged(i) for i in range(3)]
        for x in works:
            mb.put(x)
        assert works[0].future.result(5) == 0 and works[2].future.result(5) == 2
        with pytest.raises(RuntimeError, match="exploded"):
            works[1].future.result(5)
        assert errors == ["sink exploded"]
    finally:
        mb.stop(2.0)



def test_pipelining_pays_only_when_the_model_call_is_the_longer_half():
    p = BatchPolicy()
    assert not p.pipeline_pays()  # nothing measured yet: deliver on the runner
    p.observe_run(0.0004)
    p.observe_finish(0.00005)
    assert p.pipeline_pays()  # a CNN call hides its delivery
    p.observe_finish(0.0003)  # (EWMA: 0.8 * 50 + 0.2 * 300 = 100 us)
    assert p.pipeline_pays()
    p.observe_finish(0.0008)  # 240 us: no longer clearly shorter than the 400 us call
    assert not p.pipeline_pays()
    for _ in range(20):
        p.observe_finish(0.0008)  # a sink writing many lines per short call
    assert not p.pipeline_pays()


@pytest.mark.parametrize("run_s, finish_s, deliverer", [(0.004, 0.0, True), (0.0, 0.004, False)])
def test_the_batcher_measures_which_half_is_longer(run_s, finish_s, deliverer):
    names = []

    def process(segs):
        time.sleep(run_s)

        def finish():
            time.sleep(finish_s)
            names.append(threading.current_thread().name)
            for s in segs:
                s.work.future.set_result(True)
        return finish

    mb = MicroBatcher(BatchPolicy(max_batch=1, max_delay_s=0.0), process).start()
    try:
        for _ in range(6):
            mb.put(_fut_work())
        assert _wait_until(lambda: len(names) == 6)
    finally:
        mb.stop(2.0)
    # The first batch is always delivered by the runner (nothing measured yet).
    assert names[0] == "edgeship-batcher"
    assert (names[-1] == "edgeship-batcher-deliver") == deliverer



def test_ran_since_tells_when_the_batch_running_at_a_swap_is_over():
    gate, entered = threading.Event(), threading.Event()

    def process(segs):
        entered.set()
        gate.wait(5)
        for s in segs:
            s.work.future.set_result(True)

    mb = MicroBatcher(BatchPolicy(max_batch=1, max_delay_s=0.0), process).start()
    try:
        first = _fut_work()
        mb.put(first)
        assert entered.wait(5)
        swap = time.monotonic()
        assert not mb.ran_since(swap)  # the batch that started before the swap still runs
        entered.clear()
        second = _fut_work()
        mb.put(second)
        gate.set()
        assert first.future.result(5) and second.future.result(5)
        assert mb.ran_since(swap)  # idle, or running a batch that started after
    finally:
        gate.set()
        mb.stop(2.0)


# -- metrics ------------------------------------------------------------------------

def test_histogram_percentiles_and_constant_memory():
    h = Histogram(LATENCY_BOUNDS_MS)
    rng = np.random.default_rng(0)
    vals = rng.lognormal(0.0, 0.5, 100_000)
    h.add_many(vals)
    size = len(h.counts)
    h.add_many(vals)
    assert len(h.counts) == size and h.count == 200_000
    for q in (50, 95, 99):
        exact = np.percentile(vals, q)
        assert abs(h.percentile(q) - exact) / exact < 0.12
    assert h.percentile(0) == pytest.approx(vals.min()) and h.percentile(100) == pytest.approx(vals.max())


def test_histogram_add_paths_agree_merge_and_roundtrip():
    a, b, c = Histogram(BATCH_BOUNDS), Histogram(BATCH_BOUNDS), Histogram(BATCH_BOUNDS)
    vals = [1, 1, 3, 8, 9, 64, 64, 2000]
    for v in vals:
        a.add(v)
    b.add_many(vals)
    assert a.counts == b.counts and a.total == b.total
    c.add_repeated(64, 2)
    c.merge(a)
    assert c.count == 10
    d = Histogram.from_dict(c.to_dict())
    assert d.counts == c.counts and d.min == 1 and d.max == 2000
    assert percentiles(c.to_dict())["p50"] == c.percentile(50)
    with pytest.raises(ValueError):
        a.merge(Histogram(LATENCY_BOUNDS_MS))


def test_histogram_constant_reports_constant_and_empty_is_none():
    h = Histogram()
    assert h.percentile(50) is None and h.to_dict()["min"] is None
    h.add_repeated(0.3, 1000)
    assert h.percentile(50) == pytest.approx(0.3) and h.percentile(99) == pytest.approx(0.3)
    h.add(float("nan"))
    assert h.count == 1000


def test_counters_delta():
    c = Counters(["a"])
    c.inc("a", 3)
    snap = c.snapshot()
    c.inc("a")
    c.inc("b", 2)
    assert c.delta(snap) == {"a": 1, "b": 2}


# -- cache and backoff ------------------------------------------------------------------

def test_result_cache_lru_ttl_and_counts():
    now = [0.0]
    cache = ResultCache(max_entries=2, ttl_s=10, clock=lambda: now[0])
    k1, k2, k3 = (input_key([np.array([i], np.float32)]) for i in range(3))
    cache.put(k1, "one")
    cache.put(k2, "two")
    assert cache.get(k1) == "one"      # k1 now most recent
    cache.put(k3, "three")             # evicts k2
    assert cache.get(k2) is None and cache.evictions == 1
    now[0] = 11.0
    assert cache.get(k1) is None and cache.expired == 1
    assert cache.hits == 1 and cache.misses == 2


def test_cache_keys_distinguish_shape_dtype_and_rows():
    x = np.arange(6, dtype=np.float32)
    assert input_key([x]) != input_key([x.reshape(2, 3)])
    assert input_key([x]) != input_key([x.astype(np.float64)])
    block = np.stack([x, x, x + 1])
    keys = row_keys([block], 0, 3)
    assert keys[0] == keys[1] != keys[2]
    assert keys[0] == row_keys([x[None]], 0, 1)[0]


def test_backoff_schedule():
    assert [backoff_delay(i, 0.1, 1.0) for i in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
