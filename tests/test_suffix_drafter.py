"""The suffix automaton against brute force, and the suffix drafter driven like the schedulers drive it."""

import random

import numpy as np
import pytest

from exo.inference.generate import GenerationParams
from exo.speculative.drafters import DraftBlock
from exo.speculative.drafters.suffix import SuffixDrafter
from exo.speculative.drafters.suffix_automaton import SuffixAutomaton


def text(tokens) -> str:
    """Tokens as a str (one character per id), so brute force can use C-speed substring search."""
    return "".join(map(chr, tokens))


def longest_suffix_in(sequence, haystack) -> int:
    """The longest suffix of `sequence` that is a substring of `haystack` (binary search:
    if a suffix occurs, so do all shorter ones)."""
    s, h = text(sequence), text(haystack)
    lo, hi = 0, min(len(s), len(h))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if s[len(s) - mid:] in h:
            lo = mid
        else:
            hi = mid - 1
    return lo


def brute_match(tokens) -> int:
    """The longest suffix occurring ending strictly before the last position."""
    return longest_suffix_in(tokens, tokens[:-1])


def occurs_at(haystack, needle_end, sequence, length) -> bool:
    """`sequence`'s last `length` tokens occur in `haystack` ending at `needle_end`."""
    return (length == 0 and needle_end == -1) or (
        length <= needle_end + 1 <= len(haystack) and
        haystack[needle_end - length + 1:needle_end + 1] == sequence[len(sequence) - length:])


def random_tokens(rng: random.Random, n: int, sigma: int) -> list[int]:
    return [rng.randrange(sigma) for _ in range(n)]


def repetitive(rng: random.Random, n: int, sigma: int = 50) -> list[int]:
    """Copies of earlier stretches with a few edits, like code or structured text."""
    out = random_tokens(rng, 40, sigma)
    while len(out) < n:
        if rng.random() < 0.7:
            start = rng.randrange(len(out))
            out += out[start:start + rng.randrange(3, 40)]
        else:
            out += random_tokens(rng, rng.randrange(1, 6), sigma)
    return out[:n]


def fibonacci_word(n: int) -> list[int]:
    a, b = [0], [0, 1]
    while len(b) < n:
        a, b = b, b + a
    return b[:n]


SEQUENCES = {
    "binary": lambda: random_tokens(random.Random(2), 2000, 2),
    "ternary": lambda: random_tokens(random.Random(3), 2000, 3),
    "fifty": lambda: random_tokens(random.Random(50), 2000, 50),
    "repetitive": lambda: repetitive(random.Random(7), 2000),
    "fibonacci": lambda: fibonacci_word(1500),
    "periodic": lambda: [1, 2, 3, 4, 5] * 300,
}


@pytest.mark.parametrize("name", list(SEQUENCES))
def test_match_cursor_equals_brute_force_after_every_append(name):
    tokens = SEQUENCES[name]()
    automaton = SuffixAutomaton()
    for i, token in enumerate(tokens):
        automaton.append(token)
        prefix = tokens[:i + 1]
        length, end = automaton.match_length, automaton.match_end
        assert length == brute_match(prefix), (name, i)
        assert end <= i - 1  # strictly before the last position: a continuation exists
        assert occurs_at(prefix, end, prefix, length), (name, i, length, end)
        state = automaton.cursor.state  # the cursor sits in the state its string belongs to
        assert length == 0 or automaton._length[automaton._link[state]] < length <= automaton._length[state]
    assert len(automaton) == len(tokens)
    assert automaton.states <= 2 * len(tokens)


def test_a_constructor_sequence_is_appended_token_by_token():
    tokens = repetitive(random.Random(1), 500)
    one, other = SuffixAutomaton(tokens), SuffixAutomaton()
    for token in tokens:
        other.append(token)
    assert one.cursor == other.cursor and one.states == other.states


@pytest.mark.parametrize("sigma", [2, 3, 50])
def test_a_cursor_over_an_unindexed_tail_equals_brute_force(sigma):
    rng = random.Random(100 + sigma)
    for n in (0, 1, 5, 50, 400, 1500):
        indexed = repetitive(rng, n, sigma) if n else []
        automaton = SuffixAutomaton(indexed)
        before = (automaton.cursor.copy(), automaton.states, automaton.work, len(automaton))
        for _ in range(30):
            if indexed and rng.random() < 0.6:  # a tail that continues some earlier stretch, then strays
                start = rng.randrange(n)
                tail = indexed[start:start + rng.randrange(1, 30)] + random_tokens(rng, rng.randrange(0, 3), sigma)
            else:
                tail = random_tokens(rng, rng.randrange(1, 20), sigma)
            cursor = automaton.follow(tail)
            whole = indexed + tail
            assert cursor.length == longest_suffix_in(whole, indexed), (n, tail)
            assert cursor.end <= n - 1
            assert occurs_at(indexed, cursor.end, whole, cursor.length)
            # Resuming a cursor is the same as running over the concatenation.
            cut = rng.randrange(len(tail) + 1)
            assert automaton.follow(tail[cut:], automaton.follow(tail[:cut])) == cursor
        assert automaton.follow([]) == automaton.cursor
        assert (automaton.cursor, automaton.states, automaton.work, len(automaton)) == before


@pytest.mark.parametrize("name,make", [
    ("binary", lambda n: random_tokens(random.Random(1), n, 2)),
    ("fifty", lambda n: random_tokens(random.Random(2), n, 50)),
    ("repetitive", lambda n: repetitive(random.Random(3), n)),
    ("fibonacci", fibonacci_word),
    ("one-token", lambda n: [7] * n),
    ("periodic", lambda n: list(range(13)) * (n // 13 + 1)),
])
def test_work_per_token_is_amortised_constant(name, make):
    n = 20_000
    automaton = SuffixAutomaton(make(n)[:n])
    # Transitions (<= 3n), their copies into clones and redirections, and suffix-link walks
    # of the construction and the cursor are all O(n) in total; no timing involved.
    assert automaton.work <= 8 * n, automaton.work / n
    assert automaton.states <= 2 * n


# ---- the drafter


PARAMS = GenerationParams()
RNG = np.random.default_rng(0)


async def propose(drafter, rid, committed, k):
    return await drafter.propose(rid, committed, k, PARAMS, 0.8, RNG)


def expected_continuation(sequence, end, depth):
    """What followed position `end`, copied on through itself where it reaches the end."""
    out = []
    full = list(sequence)
    for j in range(depth):
        full.append(full[end + 1 + j])
        out.append(full[-1])
    return out


def assert_valid_block(block: DraftBlock, drafter: SuffixDrafter, rid, sequence, indexed, k):
    """The block follows a real occurrence, in the indexed text, of the longest suffix of `sequence`
    found there, and is as long as the rule and the caps allow."""
    if len(indexed) == len(sequence):  # no tail: the occurrence must end before the last token
        indexed = indexed[:-1]
    match = longest_suffix_in(sequence, indexed)
    assert drafter.last_match(rid) == match
    assert block.base_length == len(sequence) and block.probs is None and block.steps == 0
    if match < drafter.min_match:
        assert block.tokens == []
        return
    depth = min(k, drafter.max_depth, drafter.length_rule(match))
    assert len(block.tokens) == depth
    s, h = text(sequence[len(sequence) - match:]), text(indexed)
    ends, at = [], h.find(s)
    while at != -1:
        ends.append(at + match - 1)
        at = h.find(s, at + 1)
    assert any(expected_continuation(sequence, e, depth) == block.tokens for e in ends)


async def test_a_repeated_passage_is_proposed_as_its_true_continuation():
    rng = random.Random(5)
    passage = random_tokens(rng, 200, 1000)
    prompt = random_tokens(rng, 50, 1000) + passage + random_tokens(rng, 30, 1000)
    drafter = SuffixDrafter()
    await drafter.prefill("r", prompt)
    committed = prompt + passage[:6]  # the model starts quoting the passage
    block = await propose(drafter, "r", committed, 8)
    assert block.tokens == passage[6:12]  # match 6 -> 6 tokens (factor 1), under k
    assert drafter.last_match("r") == 6
    drafter.accept("r", len(committed) + 6)  # all accepted; the target adds a bonus token
    committed += passage[6:13]
    block = await propose(drafter, "r", committed, 64)
    assert block.tokens == passage[13:26] and drafter.last_match("r") == 13
    drafter.accept("r", len(committed) + 13)
    committed += passage[13:27]
    block = await propose(drafter, "r", committed, 64)
    assert block.tokens == passage[27:54]
    drafter.accept("r", len(committed) + 27)
    committed += passage[27:55]
    block = await propose(drafter, "r", committed, 64)
    assert block.tokens == passage[55:55 + 32] and drafter.last_match("r") == 55  # max_depth caps the rule's 55
    assert drafter.indexed("r") == len(committed) - 1  # the bonus token is the unconfirmed tail


async def test_caps_min_match_and_length_rule():
    prompt = list(range(100)) + [500] + list(range(5))
    drafter = SuffixDrafter(min_match=3, length_rule=lambda m: 2 * m, max_depth=10)
    await drafter.prefill("r", prompt)
    block = await propose(drafter, "r", prompt + [5, 6], 50)  # match 0..6: 14 by the rule, 10 by the cap
    assert block.tokens == list(range(7, 17)) and drafter.last_match("r") == 7
    drafter.release("r")
    await drafter.prefill("r", prompt)
    assert (await propose(drafter, "r", prompt + [5, 6], 3)).tokens == [7, 8, 9]  # the caller's k
    drafter.release("r")
    await drafter.prefill("r", list(range(40)))
    block = await propose(drafter, "r", list(range(40)) + [5, 6], 8)
    assert block.tokens == [] and drafter.last_match("r") == 2  # below min_match: nothing, match still told
    assert (await propose(drafter, "r", list(range(40)) + [5, 6], 0)).tokens == []


async def test_a_periodic_tail_is_continued_through_the_proposal_itself():
    drafter = SuffixDrafter(length_rule=lambda m: 100)
    await drafter.prefill("r", [9, 1, 2, 3, 1, 2, 3])
    block = await propose(drafter, "r", [9, 1, 2, 3, 1, 2, 3, 1], 10)
    assert block.tokens == [2, 3, 1, 2, 3, 1, 2, 3, 1, 2]


class Truth:
    """A target that would emit `tokens` in order: accepts the matching prefix of a block,
    then emits its own next token (the correction, or the bonus after a full block)."""

    def __init__(self, tokens):
        self.tokens = tokens

    def verify(self, committed, block):
        accepted = 0
        while accepted < len(block) and block[accepted] == self.tokens[len(committed) + accepted]:
            accepted += 1
        emitted = block[:accepted] + [self.tokens[len(committed) + accepted]]
        return emitted, accepted


async def test_sequential_use_matches_brute_force_on_every_block():
    rng = random.Random(11)
    truth = Truth(repetitive(rng, 3000, 60))
    prompt = truth.tokens[:300]
    drafter = SuffixDrafter(resync=False)  # the automaton's own matches (resuming: tested below)
    await drafter.prefill("r", prompt)
    committed = prompt + [truth.tokens[300]]  # the target's prefill emits the first token
    accepted_total = 0
    while len(committed) < 2800:
        k = rng.randrange(1, 12)
        block = await propose(drafter, "r", committed, k)
        indexed = committed[:drafter.indexed("r")]
        assert indexed == truth.tokens[:len(indexed)]  # only committed tokens are ever indexed
        assert_valid_block(block, drafter, "r", committed, indexed, k)
        emitted, accepted = truth.verify(committed, block.tokens)
        if block.tokens:
            drafter.accept("r", block.base_length + accepted)
        accepted_total += accepted
        committed += emitted
    assert accepted_total > 1000  # the repeats are found
    drafter.release("r")
    drafter.release("r")  # idempotent


@pytest.mark.parametrize("accept_every_verdict", [False, True])
async def test_pipelined_use_with_blocks_in_flight_stays_consistent(accept_every_verdict):
    """Like the pipelined scheduler: draft on committed + unverified blocks (assumed accepted);
    on a divergence, accept the true committed length and redraft after the corrected token."""
    rng = random.Random(12 + accept_every_verdict)
    truth = Truth(repetitive(rng, 4000, 40))
    prompt = truth.tokens[:200]
    drafter = SuffixDrafter(resync=False)
    await drafter.prefill("p", prompt)
    committed = prompt + [truth.tokens[200]]
    sequence, in_flight = list(committed), []
    blocks = 0
    while len(committed) < 3500:
        if len(in_flight) < 2 and rng.random() < 0.7:
            k = rng.randrange(1, 10)
            block = await propose(drafter, "p", sequence, k)
            indexed = sequence[:drafter.indexed("p")]
            assert indexed == truth.tokens[:len(indexed)]
            assert_valid_block(block, drafter, "p", sequence, indexed, k)
            if block.tokens:
                sequence += block.tokens
                in_flight.append(block)
                blocks += 1
            continue
        if not in_flight:  # a plain step: the target emits one token
            committed.append(truth.tokens[len(committed)])
            sequence = list(committed)
            drafter.accept("p", len(committed) - 1)
            continue
        block = in_flight.pop(0)
        assert block.base_length == len(committed)
        emitted, accepted = truth.verify(committed, block.tokens)
        if accepted == len(block.tokens):
            emitted = emitted[:-1]  # the bonus is deferred: the next block stays valid
            committed += emitted
            if accept_every_verdict:
                drafter.accept("p", len(committed))
        else:
            committed += emitted
            in_flight.clear()
            drafter.accept("p", len(committed) - len(emitted) + accepted)
            sequence = list(committed)
    assert blocks > 100
    assert drafter.indexed("p") <= len(committed)


async def test_a_copy_resumes_past_one_replaced_token():
    """A rewrite that re-indents a line replaces one token of its source and then follows it
    again; the automaton's match has to include the new token, so only resuming finds it."""
    rng = random.Random(7)
    source = random_tokens(rng, 60, 1000)
    prompt = random_tokens(rng, 20, 1000) + source + random_tokens(rng, 10, 1000)
    for resync in (True, False):
        drafter = SuffixDrafter(resync=resync)
        await drafter.prefill("r", prompt)
        committed = prompt + source[:8]
        assert (await propose(drafter, "r", committed, 32)).tokens == source[8:16]
        drafter.accept("r", len(committed) + 3)  # three kept, the fourth replaced
        committed += source[8:11] + [5000]
        block = await propose(drafter, "r", committed, 32)
        if not resync:
            assert block.tokens == [] and not drafter.last_resumed("r")  # 5000 was never seen
            continue
        assert drafter.last_resumed("r") and drafter.last_match("r") == 8 + 3  # the copy's match + its hits
        assert block.tokens == source[12:23]
        # Each immediate miss halves the length drafted by (11, 5, 2); below 4 it stops resuming.
        for miss, (length, start) in enumerate([(5, 13), (2, 14)]):
            drafter.accept("r", len(committed))
            committed += [6000 + miss]
            block = await propose(drafter, "r", committed, 32)
            assert drafter.last_resumed("r") and block.tokens == source[start:start + length]
        drafter.accept("r", len(committed))
        committed += [7000]
        assert (await propose(drafter, "r", committed, 32)).tokens == [] and not drafter.last_resumed("r")


async def test_a_longer_automaton_match_beats_a_resumed_copy():
    rng = random.Random(8)
    source, edited = random_tokens(rng, 40, 1000), random_tokens(rng, 20, 1000)
    # The same edit was made before, right after the source: the automaton has the edit itself.
    prompt = source + source[:11] + [5000] + edited
    drafter = SuffixDrafter()
    await drafter.prefill("r", prompt)
    committed = prompt + source[:8]
    await propose(drafter, "r", committed, 32)
    committed += source[8:11] + [5000]
    drafter.accept("r", len(committed) - 1)
    block = await propose(drafter, "r", committed, 32)
    assert not drafter.last_resumed("r") and drafter.last_match("r") == 12 and block.tokens == edited[:12]


async def test_an_accept_forgets_the_speculative_tail_it_ran_over():
    rng = random.Random(4)
    prompt = repetitive(rng, 300, 20)
    a, b = prompt[100:103], prompt[200:202] + [prompt[102]]  # two tails ending in the same token
    drafter = SuffixDrafter(min_match=1)
    await drafter.prefill("r", prompt)
    await propose(drafter, "r", prompt + a, 8)
    drafter.accept("r", len(prompt))  # none of the tail was committed
    block = await propose(drafter, "r", prompt + b, 8)
    fresh = SuffixDrafter(min_match=1)
    await fresh.prefill("r", prompt)
    assert block.tokens == (await propose(fresh, "r", prompt + b, 8)).tokens
    assert drafter.last_match("r") == fresh.last_match("r") == longest_suffix_in(prompt + b, prompt)


async def test_a_rollback_below_the_indexed_tokens_raises():
    drafter = SuffixDrafter()
    prompt = list(range(50))
    await drafter.prefill("r", prompt)
    committed = prompt + [1, 2, 3, 4]
    await propose(drafter, "r", committed, 4)
    drafter.accept("r", 53)
    await propose(drafter, "r", committed, 4)  # indexes up to 53
    assert drafter.indexed("r") == 53
    with pytest.raises(RuntimeError, match="rolled back"):
        await propose(drafter, "r", committed[:52], 4)
    with pytest.raises(RuntimeError, match="disagrees"):
        await propose(drafter, "r", committed[:51] + [99, 3, 4], 4)
    with pytest.raises(RuntimeError, match="only 52"):
        drafter.accept("r", 52)
    drafter.accept("r", 53)  # the same length again is fine
    assert (await propose(drafter, "r", committed, 4)).base_length == len(committed)


async def test_release_is_idempotent_and_forgets_the_request():
    drafter = SuffixDrafter()
    drafter.release("never-seen")
    await drafter.prefill("r", [1, 2, 3])
    with pytest.raises(RuntimeError, match="before its prefill"):
        await drafter.prefill("r", [1, 2, 3])
    drafter.release("r")
    drafter.release("r")
    with pytest.raises(RuntimeError, match="prefill it first"):
        await propose(drafter, "r", [1, 2, 3], 4)
    await drafter.prefill("r", [4, 5, 4])  # a fresh start under the same id
    assert (await propose(drafter, "r", [4, 5, 4, 5], 4)).tokens == [4, 5]  # after the first 4, 5
    assert drafter.last_match("r") == 2


async def test_a_drafter_serves_one_request():
    """Bound by its first prefill: another id is refused, also after a release (only the same
    id may start over)."""
    drafter = SuffixDrafter()
    await drafter.prefill("r", [1, 2, 3, 1, 2])
    with pytest.raises(RuntimeError, match="bound to one request"):
        await propose(drafter, "s", [1, 2, 3, 1, 2], 4)
    with pytest.raises(RuntimeError, match="bound to one request"):
        drafter.accept("s", 5)
    with pytest.raises(RuntimeError, match="bound to one request"):
        drafter.release("s")
    assert (await propose(drafter, "r", [1, 2, 3, 1, 2], 4)).tokens == [3, 1]  # "r" is untouched
    drafter.release("r")
    with pytest.raises(RuntimeError, match="bound to one request"):
        await drafter.prefill("s", [1, 2, 3])
    await drafter.prefill("r", [1, 2, 3])


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError):
        SuffixDrafter(min_match=0)
    with pytest.raises(ValueError):
        SuffixDrafter(max_depth=-1)
