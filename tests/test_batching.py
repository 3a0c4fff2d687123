"""Continuous batching: requests' calls that wait at the same moment share one forward pass,
and no request's output depends on who it was batched with."""

import math
import threading
import time

import anyio
import httpx
import msgspec
import numpy as np
import pytest

from exo.inference.batching import StepBatcher
from exo.inference.engine import PASS, last_only
from exo.inference.generate import GenerationParams
from exo.speculative.adaptive import AdaptiveK, WindowedMedian
from exo.speculative.config import SpeculativeConfig
from exo.speculative.events import SpeculationFallback
from exo.speculative.kv import rollback_to
from tests.helpers.api_server import running_api
from tests.helpers.decoding import collect


# -- the batcher alone ------------------------------------------------------------------------
def recording_batcher(max_size=8, active=lambda: 8, pass_s=0.03, fail=()):
    passes: list[list[int]] = []

    async def run(items):
        passes.append(list(items))
        await anyio.sleep(pass_s)
        return [ValueError(f"bad {i}") if i in fail else i * 10 for i in items]

    return StepBatcher(run, lambda item: 1, active, max_size), passes


async def test_calls_waiting_together_share_one_pass_with_their_own_results():
    batcher, passes = recording_batcher()
    results = {}

    async def call(i):
        results[i], _ = await batcher.submit(i)

    async with anyio.create_task_group() as group:
        for i in range(5):
            group.start_soon(call, i)
    assert results == {i: i * 10 for i in range(5)}
    assert passes[0] == [0]  # an idle engine runs the first call at once
    assert sorted(passes[1]) == [1, 2, 3, 4] and len(passes) == 2
    assert batcher.last.rows == 4 and batcher.most_rows == 4


async def test_a_bad_row_fails_alone():
    batcher, _ = recording_batcher(fail={2})
    outcomes = {}

    async def call(i):
        try:
            outcomes[i] = (await batcher.submit(i))[0]
        except ValueError as exc:
            outcomes[i] = str(exc)

    async with anyio.create_task_group() as group:
        for i in range(4):
            group.start_soon(call, i)
    assert outcomes == {0: 0, 1: 10, 2: "bad 2", 3: 30}


async def test_the_bound_holds_and_every_request_takes_its_turn():
    """Seven requests in a loop of calls, at most two per pass: every call runs, no pass
    holds more than two, and a request never waits more than ceil(7 / 2) passes."""
    batcher, passes = recording_batcher(max_size=2, active=lambda: 7, pass_s=0.005)
    done = {i: 0 for i in range(7)}

    async def client(i):
        for _ in range(6):
            assert (await batcher.submit(i))[0] == i * 10
            done[i] += 1

    with anyio.fail_after(30):
        async with anyio.create_task_group() as group:
            for i in range(7):
                group.start_soon(client, i)
    assert done == {i: 6 for i in range(7)}
    assert max(len(p) for p in passes) == 2
    for i in range(7):
        ran = [n for n, p in enumerate(passes) if i in p]
        assert max(b - a for a, b in zip(ran, ran[1:])) <= math.ceil(7 / 2)


async def test_a_cancelled_waiting_call_leaves_and_a_cancelled_leader_finishes_its_pass():
    batcher, passes = recording_batcher(pass_s=0.2)
    results = {}

    async def call(i):
        results[i] = (await batcher.submit(i))[0]

    waiting = anyio.CancelScope()

    async def cancellable(i):
        with waiting:
            await call(i)

    async with anyio.create_task_group() as group:
        group.start_soon(call, 0)  # leads the first pass
        await anyio.sleep(0.02)
        group.start_soon(cancellable, 1)
        await anyio.sleep(0.01)
        group.start_soon(call, 2)
        await anyio.sleep(0.02)
        waiting.cancel()  # 1 is waiting: it leaves
    assert 1 not in results and results == {0: 0, 2: 20}
    assert all(1 not in p for p in passes)

    passes.clear()
    results.clear()
    async with anyio.create_task_group() as group:
        leader = anyio.CancelScope()

        async def lead():
            with leader:
                await call(5)

        group.start_soon(lead)
        await anyio.sleep(0.06)  # past the leader's gather window: 6 waits for the next pass
        group.start_soon(call, 6)
        await anyio.sleep(0.02)
        leader.cancel()  # mid-pass: the pass still completes, and 6 is served after it
    assert results[6] == 60 and passes == [[5], [6]]


async def test_a_follower_cancelled_inside_its_pass_gets_the_cancellation_and_nothing_else():
    """The pass runs shielded for its partners; the cancelled follower raises only its
    cancellation (once a ValueError from removing it from a queue it had already left)."""
    batcher, passes = recording_batcher(pass_s=0.2)
    results, raised = {}, []

    async def call(i):
        results[i] = (await batcher.submit(i))[0]

    follower = anyio.CancelScope()

    async def cancellable(i):
        try:
            with follower:
                await call(i)
        except BaseException as exc:  # recorded: the test asserts nothing but a cancellation ends it
            raised.append(exc)
            raise

    async with anyio.create_task_group() as group:
        group.start_soon(call, 0)  # leads the first pass
        await anyio.sleep(0.02)
        group.start_soon(call, 2)  # leads the second pass
        await anyio.sleep(0.01)
        group.start_soon(cancellable, 1)  # follows in it
        await anyio.sleep(0.25)
        assert passes[-1] == [2, 1]
        follower.cancel()
    assert follower.cancelled_caught and not raised
    assert results == {0: 0, 2: 20} and passes == [[0], [2, 1]]
    assert not batcher._waiting and not batcher._busy


async def test_a_leader_cancelled_while_it_gathers_hands_the_engine_on():
    """The caller that found the engine idle and is cancelled while it waits for partners
    leaves the engine to the next call (once the engine stayed busy with nobody leading, and
    every later call waited forever)."""
    batcher, passes = recording_batcher(active=lambda: 4, pass_s=0.2)
    await batcher.submit(9)  # a pass on record: the next leader gathers for 0.03 s
    results = {}

    async def call(i):
        results[i] = (await batcher.submit(i))[0]

    with anyio.fail_after(5):
        with anyio.move_on_after(0.01):
            await batcher.submit(1)  # leads, gathers, is cancelled before its pass
        await call(2)
    assert results == {2: 20} and passes == [[9], [2]] and not batcher._busy


async def test_a_cancel_fuzz_gives_every_call_its_own_result_or_a_cancellation():
    """40 clients submit calls in a loop and are cancelled at random moments (waiting, leading,
    or riding in a pass): every call ends with its own result or a cancellation, no call runs
    twice, no pass breaks the bounds, and the batcher ends idle."""
    rng = np.random.default_rng(7)
    ran: list[str] = []
    passes: list[list[str]] = []

    async def run(items):
        passes.append(list(items))
        ran.extend(items)
        await anyio.sleep(float(rng.uniform(0.001, 0.01)))
        return [f"out-{item}" for item in items]

    batcher = StepBatcher(run, lambda item: int(item.split("-")[2]), lambda: 40, max_size=6)
    batcher.budget = 12
    outcomes: dict[str, str] = {}

    async def client(c: int) -> None:
        for k in range(15):
            item = f"{c}-{k}-{int(rng.integers(1, 5))}"
            with anyio.CancelScope() as scope:
                scope.deadline = anyio.current_time() + float(rng.exponential(0.02))
                result, record = await batcher.submit(item)
                assert result == f"out-{item}" and record.rows <= 6
                outcomes[item] = "result"
            if scope.cancelled_caught:
                outcomes[item] = "cancelled"

    with anyio.fail_after(60):
        async with anyio.create_task_group() as group:
            for c in range(40):
                group.start_soon(client, c)
    assert len(outcomes) == 40 * 15
    assert len(ran) == len(set(ran))  # nothing ran twice
    assert all(outcomes[item] == "result" for item in ran if item in outcomes and outcomes[item] == "result")
    assert {item for item, how in outcomes.items() if how == "result"} <= set(ran)
    assert all(len(p) <= 6 and (len(p) == 1 or sum(int(i.split("-")[2]) for i in p) <= 12) for p in passes)
    cancelled = sum(how == "cancelled" for how in outcomes.values())
    in_pass = sum(1 for item in ran if outcomes[item] == "cancelled")
    assert cancelled > 50 and in_pass > 5, (cancelled, in_pass)  # both kinds of cancellation happened
    assert not batcher._waiting and not batcher._busy


async def test_the_leader_waits_a_little_for_active_requests_between_calls():
    batcher, passes = recording_batcher(active=lambda: 3, pass_s=0.2)
    await batcher.submit(9)  # a pass on record: the gather window is a fraction of it

    async def late(i, delay):
        await anyio.sleep(delay)
        await batcher.submit(i)

    async with anyio.create_task_group() as group:
        for i, delay in enumerate((0.0, 0.005, 0.01)):
            group.start_soon(late, i, delay)
    assert sorted(passes[-1]) == [0, 1, 2]


# -- real engines: a row's numbers are its solo numbers -----------------------------------------
@pytest.mark.parametrize("model", ["tiny_llama", "smollm2_dir"])
async def test_batched_rows_equal_solo_rows(request, mlx_engine, model):
    """Requests at different offsets, blocks of different lengths, prompts and steps in one
    pass: every row's logits are bitwise those of the request run alone."""
    model_dir = request.getfixturevalue(model)
    batched, solo = mlx_engine(), mlx_engine()
    shard = await batched.full_shard(str(model_dir))
    rng = np.random.default_rng(3)
    prompts = [rng.integers(5, 300, size=n).tolist() for n in (3, 17, 40, 9)]

    for round_ in range(4):
        blocks = prompts if round_ == 0 else [rng.integers(5, 300, size=int(rng.integers(1, 7))).tolist()
                                               for _ in prompts]
        expected = [(await solo.infer_tensor(f"r{i}", shard, np.asarray([b]), last_only(len(b))))[0]
                    for i, b in enumerate(blocks)]
        got = {}

        async def row(i, b):
            got[i] = await batched.infer_tensor(f"r{i}", shard, np.asarray([b]), last_only(len(b)))

        async with anyio.create_task_group() as group:
            for i, b in enumerate(blocks):
                group.start_soon(row, i, b)
        for i in range(len(blocks)):
            np.testing.assert_array_equal(got[i][0], expected[i])
            assert got[i][1][PASS].positions >= len(blocks[i])
    assert batched.batcher.batched_rows > 0 and batched.batcher.passes < 4 * len(prompts)


async def test_rollback_fuzz_with_batched_verifies(mlx_engine, tiny_llama):
    """Rows that keep different prefixes of their blocks after each batched pass: every
    row's cache equals its solo twin's, position for position, after every step."""
    batched, solo = mlx_engine(), mlx_engine()
    shard = await batched.full_shard(str(tiny_llama))
    rng = np.random.default_rng(21)
    rids = [f"f{i}" for i in range(5)]
    for step in range(30):
        blocks = {rid: rng.integers(0, 300, size=int(rng.integers(1, 7))).tolist()
                  for rid in rids if rng.random() < 0.8}  # some rows sit a pass out
        for rid, block in blocks.items():
            await solo.infer_tensor(rid, shard, np.asarray([block]))

        async def row(rid, block):
            await batched.infer_tensor(rid, shard, np.asarray([block]))

        async with anyio.create_task_group() as group:
            for rid, block in blocks.items():
                group.start_soon(row, rid, block)
        for rid, block in blocks.items():
            keep = batched.cache_offset(rid) - int(rng.integers(0, len(block) + 1))
            rollback_to(batched, rid, keep)
            rollback_to(solo, rid, keep)
        for rid in rids:
            assert batched.cache_offset(rid) == solo.cache_offset(rid)
            mine, theirs = batched._caches.get(rid), solo._caches.get(rid)
            if mine is None:
                assert theirs is None
                continue
            n = mine.offset
            for a, b in zip(mine.layers, theirs.layers):
                np.testing.assert_array_equal(np.array(a.keys[..., :n, :]), np.array(b.keys[..., :n, :]))
                np.testing.assert_array_equal(np.array(a.values[..., :n, :]), np.array(b.values[..., :n, :]))
    assert batched.batcher.batched_rows > 0


# -- whole requests --------------------------------------------------------------------------
# A sampled request is reproducible from its seed when its drafts are: with a fixed K. With
# adaptive K (or the hybrid's choice) the drafts follow measured timings, and batching changes
# timings, so only the distribution is the same (tests/test_ring_distribution.py, test_pipeline.py).
FIXED = dict(adaptive_speculation=False, acceptance_threshold=0.0)
REQUESTS = [
    # prompt, max tokens, temperature, seed, per-request config
    ([10, 20, 30], 24, 0.0, None, dict(drafter="model")),
    (list(range(40, 72)), 12, 0.0, None, dict(drafter="suffix")),
    ([104, 101, 108, 108, 111], 30, 0.8, 5, dict(drafter="model", **FIXED)),
    ([7], 18, 0.0, None, dict(enabled=False)),
    ([50, 51, 52, 50, 51, 52, 50], 20, 0.0, None, dict(drafter="hybrid")),
    ([3, 1, 4, 1, 5, 9, 2, 6], 16, 0.0, None, dict(drafter="model", pipelined=True)),
    ([9, 8, 7, 9, 8, 7, 9, 8], 20, 1.0, 9, dict(drafter="suffix", **FIXED)),
    ([60, 61], 14, 0.7, 2, dict(enabled=False)),
]


@pytest.mark.parametrize("draft", ["tiny_llama", "tiny_llama_other"])
async def test_concurrent_requests_equal_their_solo_runs(request, make_speculative, tiny_llama, draft):
    """Different lengths, temperatures (seeded), drafters and schedulers, joining mid-batch
    and leaving at their own lengths: every request's tokens are its solo run's."""
    engine = make_speculative(request.getfixturevalue(draft), draft_tokens=3)
    shard = await engine.full_shard(str(tiny_llama))
    await engine.ensure_shard(shard)

    def run(i):
        prompt, max_tokens, temperature, seed, overrides = REQUESTS[i]
        config = msgspec.structs.replace(engine.config, **overrides)
        params = GenerationParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
        return collect(engine.generate(shard, prompt, params, config=config, eos_ids=frozenset()))

    solo = [await run(i) for i in range(len(REQUESTS))]
    engine.set_max_batch(1)
    unbatched = [await run(i) for i in range(len(REQUESTS))]
    engine.set_max_batch(8)
    together = {}

    async def joining(i):
        await anyio.sleep(0.01 * i)  # later requests join a batch already running
        together[i] = await run(i)

    async with anyio.create_task_group() as group:
        for i in range(len(REQUESTS)):
            group.start_soon(joining, i)
    assert [together[i] for i in range(len(REQUESTS))] == solo == unbatched
    assert engine.target.batcher.batched_rows > 0
    assert [len(t) for t in solo] == [r[1] for r in REQUESTS]


async def test_a_request_joining_busy_engines_expects_the_others_in_its_passes(make_speculative, tiny_llama):
    engine = make_speculative(tiny_llama, draft_tokens=3)
    shard = await engine.full_shard(str(tiny_llama))
    params = GenerationParams(max_tokens=12, temperature=0.0)
    async with engine.generate(shard, [1, 2, 3], params, request_id="first", eos_ids=frozenset()) as blocks:
        await blocks.__anext__()  # its prompt is through: it holds a cache on the target
        async with engine.generate(shard, [4, 5], params, request_id="second", eos_ids=frozenset()) as later:
            assert engine.requests["second"].controller.others.value == 1
            async for _ in later:
                pass
    async with engine.generate(shard, [4, 5], params, request_id="alone", eos_ids=frozenset()) as blocks:
        assert engine.requests["alone"].controller.others.value is None
        async for _ in blocks:
            pass


def test_k_shrinks_when_the_batched_pass_stops_being_cheap():
    """Pass cost flat up to 8 positions, then 0.1 s per position: alone the best K is deep,
    beside 20 other positions each extra draft costs nearly its full compute."""
    def cost(positions):
        return 1.0 + 0.02 * min(positions, 8) + 0.1 * max(positions - 8, 0)

    def controller(others):
        k = AdaptiveK(max_depth=6, initial_k=3)
        for accepted in [6, 5, 6, 4, 6, 6, 5, 6] * 2:
            for length in range(1, 8):
                k.observe_verify(length, cost(length + others), length + others)
            k.observe(6, accepted, 0.06, cost(7 + others), pass_positions=7 + others)
        return k

    alone, batched = controller(0), controller(20)
    assert batched.verify_cost(1) == pytest.approx(cost(21) / 21)  # a row's share of the pass
    assert alone.best_k() >= 4
    assert batched.best_k() < alone.best_k()

    # A new request inherits the costs measured alone; joining 20 others it prices its very
    # first block beside them, alone as before, and its own passes overrule the prior.
    joining, lone = AdaptiveK(max_depth=6, initial_k=3), AdaptiveK(max_depth=6, initial_k=3)
    for fresh, others in ((joining, 20), (lone, 0)):
        fresh.inherit_costs(alone)
        fresh.verify.update({n: WindowedMedian(9, cost(n)) for n in range(1, 28)})
        fresh.expect_others(others)
    assert joining.best_k() < lone.best_k() == alone.best_k()
    joining.observe_verify(7, cost(7), 7)
    joining.expect_others(20)  # measured now: the prior does not come back
    assert joining.others.value == 10


# -- through the real API ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def batched_api(tiny_llama, tiny_llama_other):
    config = SpeculativeConfig(enabled=True, drafter="model", draft_model=str(tiny_llama_other), draft_tokens=3)
    with running_api(str(tiny_llama), config, max_generate_tokens=64, max_batch_size=2) as (url, node):
        yield url, node


def chat(url, content, **extra):
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 24, "temperature": 0, **extra}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


CLIENTS = [("alpha", {}), ("bravo", {"stop": ["e"]}), ("charlie", {"speculative": {"enabled": False}}),
           ("delta", {"speculative": {"drafter": "suffix"}}), ("echo", {"max_tokens": 9}),
           ("foxtrot", {"speculative": {"pipelined": True}})]


def run_clients(url, clients, leaver=None):
    results = {}

    def worker(content, extra):
        results[content] = chat(url, content, **extra)

    def leave():
        body = {"messages": [{"role": "user", "content": "leaving"}], "max_tokens": 64, "temperature": 0,
                "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
            for i, _ in enumerate(response.iter_lines()):
                if i >= 3:
                    break  # the client goes away mid-batch

    threads = [threading.Thread(target=worker, args=client) for client in clients]
    if leaver:
        threads.append(threading.Thread(target=leave))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert not any(thread.is_alive() for thread in threads), "a request did not finish"
    return results


def test_more_clients_than_the_bound_all_finish_as_alone(batched_api):
    """Six clients (stop strings, lengths, drafters, plain and pipelined), two rows a pass:
    every one finishes, with its solo text, and no pass holds more than two."""
    url, node = batched_api
    solo = {content: chat(url, content, **extra) for content, extra in CLIENTS}
    batcher = node.engine.target.batcher
    batched_before = batcher.batched_rows
    assert run_clients(url, CLIENTS) == solo
    assert batcher.most_rows == 2 and batcher.batched_rows > batched_before
    stats = httpx.get(f"{url}/v1/speculative/metrics", timeout=10).json()["batching"]["target"]
    assert stats["max_batch_size"] == 2 and stats["most_rows"] == 2 and stats["batched_rows"] == batcher.batched_rows
    assert 'exo_engine_batched_rows_total{engine="target"}' in httpx.get(f"{url}/metrics", timeout=10).text


def test_a_client_leaving_mid_batch_frees_only_its_row(batched_api):
    url, node = batched_api
    clients = CLIENTS[:3]
    solo = {content: chat(url, content, **extra) for content, extra in clients}
    assert run_clients(url, clients, leaver=True) == solo
    deadline = time.monotonic() + 10
    while (node._active or node.engine.target._caches) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert node._active == 0 and not node.engine.target._caches and not node.engine.draft._caches


def test_clients_hanging_up_during_batched_passes_are_cancelled_not_failed(batched_api):
    """Twelve clients leave mid-generation, streaming and not, pipelined and not, while their rows
    share passes: each is counted cancelled or stopped, never failed, no draft failure or
    fallback is reported for them (a cancelled follower once raised a ValueError from the
    batcher), and the node then serves a normal request as before."""
    url, node = batched_api
    before_failed = node.counters.requests["failed"]
    before = node.engine.get_metrics()
    expected = chat(url, "after")
    fallbacks = []

    def record_fallbacks(event) -> bool:  # a listener that keeps only what it needs, buffering nothing
        if isinstance(event, SpeculationFallback):
            fallbacks.append(event)
        return False

    def stream_and_leave(i):
        body = {"messages": [{"role": "user", "content": f"leaving {i}"}], "max_tokens": 300, "temperature": 0,
                "stream": True, "speculative": {"pipelined": i % 2 == 0}}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
            for n, _ in enumerate(response.iter_lines()):
                if n >= 2 + i % 3:
                    break

    left = []

    def post_and_leave(i):
        body = {"messages": [{"role": "user", "content": f"gone {i}"}], "max_tokens": 450, "temperature": 0,
                "speculative": {"pipelined": i % 2 == 1}}
        try:
            httpx.post(f"{url}/v1/chat/completions", json=body, timeout=0.05 + 0.03 * i)
        except httpx.TimeoutException:
            left.append(i)

    threads = [threading.Thread(target=stream_and_leave, args=(i,)) for i in range(6)]
    threads += [threading.Thread(target=post_and_leave, args=(i,)) for i in range(6)]
    with node.events.subscribe(record_fallbacks):
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        deadline = time.monotonic() + 10
        while node._active and time.monotonic() < deadline:
            time.sleep(0.05)
    after = node.engine.get_metrics()
    assert left  # non-streaming clients left before their answer (how many depends on the machine's speed)
    assert node.counters.requests["failed"] == before_failed
    assert after["draft_failures"] == before["draft_failures"] and not fallbacks
    assert node._active == 0 and not node.engine.target._caches and not node.engine.draft._caches
    assert chat(url, "after") == expected


async def test_a_pass_holds_at_most_its_budget_of_positions_and_the_oldest_call_always():
    passes = []

    async def run(items):
        passes.append([name for name, _ in items])
        await anyio.sleep(0.03)
        return [n for _, n in items]

    batcher = StepBatcher(run, lambda item: item[1], lambda: 8, max_size=8)
    batcher.budget = 10
    async with anyio.create_task_group() as group:
        group.start_soon(batcher.submit, ("first", 2))
        await anyio.sleep(0.01)
        for item in (("prompt", 40), ("a", 3), ("b", 4), ("c", 5)):
            group.start_soon(batcher.submit, item)
            await anyio.sleep(0.001)
    assert passes == [["first"], ["prompt"], ["a", "b"], ["c"]]
