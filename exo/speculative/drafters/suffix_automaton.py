"""An online suffix automaton over token ids, with a match cursor for drafting.

`SuffixAutomaton.append(token)` extends the automaton by one token in amortised O(1)
(the standard online construction: dict transitions, suffix links, lengths) and keeps a
match cursor: the longest suffix of the indexed text that also occurs ending strictly
before the last position, with the end position of one such occurrence. A caller that
keeps the text reads the continuation after the match as `text[end + 1 : end + 1 + n]`;
it is never empty, because the occurrence ends before the last token.

`follow(tokens)` runs a copy of the cursor over tokens that are not indexed (a
speculative tail) without touching the automaton: the longest suffix of text + tail that
occurs in the indexed text.

States live in flat parallel lists indexed by state id (at most 2n - 1 states and
3n - 4 transitions for n tokens), so memory is O(n).
"""

from __future__ import annotations

from typing import Iterable

ROOT = 0


class Cursor:
    """A match: `length` tokens ending at the text's end (or the tail's), occurring also
    in the indexed text ending at position `end` (-1 when `length` is 0).

    `state` is the automaton state the matched string belongs to; a cursor is only
    meaningful for the automaton, and the automaton size, it was made with."""

    __slots__ = ("state", "length", "end")

    def __init__(self, state: int = ROOT, length: int = 0, end: int = -1):
        self.state, self.length, self.end = state, length, end

    def copy(self) -> "Cursor":
        return Cursor(self.state, self.length, self.end)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Cursor) and self.state == other.state and self.length == other.length
                and self.end == other.end)

    def __repr__(self) -> str:
        return f"Cursor(state={self.state}, length={self.length}, end={self.end})"


class SuffixAutomaton:
    """The suffix automaton of a growing token sequence, plus its match cursor.

    Per state: `_next` (token -> state), `_link` (suffix link), `_length` (longest string
    of the state) and `_end` (the end position of one occurrence of the state's strings).

    Which occurrence `_end` keeps: the most recent one that costs nothing extra to know.
    A state created for position i (the new state, or a clone) gets i, its newest
    occurrence at that moment; the state that becomes the new state's suffix link without
    a clone gets i too; and every state the construction walks past while adding
    transitions (all of them suffixes of the previous text) gets i - 1. States further up
    the suffix-link path also gain position i, but refreshing them would cost the length
    of that path per token, so their `_end` may be an older occurrence: always a real
    one, not always the newest. Recent occurrences are preferred because what a text
    repeats lately (an edited line, a loop it fell into) predicts what comes next best.

    `work` counts transitions added or redirected, transitions copied into clones and
    suffix links followed (construction and cursor): the quantity whose amortised O(1)
    per token the tests check.
    """

    __slots__ = ("_next", "_link", "_length", "_end", "_last", "_size", "cursor", "work")

    def __init__(self, tokens: Iterable[int] = ()):
        self._next: list[dict[int, int]] = [{}]
        self._link: list[int] = [-1]
        self._length: list[int] = [0]
        self._end: list[int] = [-1]
        self._last = ROOT  # the state of the whole text
        self._size = 0  # tokens indexed
        self.cursor = Cursor()
        self.work = 0
        self.extend(tokens)

    def __len__(self) -> int:
        return self._size

    @property
    def states(self) -> int:
        return len(self._length)

    @property
    def match_length(self) -> int:
        """Length of the longest suffix of the text that occurs ending before the last token."""
        return self.cursor.length

    @property
    def match_end(self) -> int:
        """End position of an earlier occurrence of that suffix (-1 when it is empty)."""
        return self.cursor.end

    def extend(self, tokens: Iterable[int]) -> None:
        append = self.append
        for token in tokens:
            append(token)

    def append(self, token: int) -> None:
        """Index one more token (amortised O(1)) and move the match cursor over it."""
        nxt, link, length, end = self._next, self._link, self._length, self._end
        i = self._size
        work = 0

        # The cursor first, against the automaton of the text without `token`: a suffix of
        # text + token found there occurs ending at most at i - 1, so it has a continuation.
        cursor = self.cursor
        v, l = cursor.state, cursor.length
        while v and token not in nxt[v]:
            v = link[v]
            l = length[v]
            work += 1
        u = nxt[v].get(token)
        if u is None:  # v is the root: the token never occurred before
            m_state, m_length, m_end = ROOT, 0, -1
        else:
            m_state, m_length, m_end = u, l + 1, end[u]

        # Then the automaton.
        cur = len(length)
        nxt.append({})
        link.append(ROOT)
        length.append(i + 1)
        end.append(i)
        p = self._last
        while p != -1 and token not in nxt[p]:
            nxt[p][token] = cur
            end[p] = i - 1  # p holds suffixes of the text so far: they end at i - 1 too
            p = link[p]
            work += 1
        if p != -1:
            q = nxt[p][token]
            if length[p] + 1 == length[q]:
                link[cur] = q
                end[q] = i  # q's strings are suffixes of the new text
            else:
                clone = len(length)
                moved = nxt[q].copy()
                work += len(moved)
                nxt.append(moved)
                link.append(link[q])
                length.append(length[p] + 1)
                end.append(i)
                while p != -1 and nxt[p].get(token) == q:
                    nxt[p][token] = clone
                    p = link[p]
                    work += 1
                link[q] = clone
                link[cur] = clone
                # The cursor's string may be among those that moved from q to the clone.
                if m_state == q and m_length <= length[clone]:
                    m_state = clone
        self._last = cur
        self._size = i + 1
        cursor.state, cursor.length, cursor.end = m_state, m_length, m_end
        self.work += work + 1

    def follow(self, tokens: Iterable[int], start: Cursor | None = None) -> Cursor:
        """A new cursor: `start` (default: the match cursor) run over `tokens`, which are not
        indexed. Its match is the longest suffix of text + tokens occurring in the indexed
        text; its `end` is at most len(self) - 1, so with a non-empty tail the continuation
        `(text + tokens)[end + 1:]` is never empty. The automaton is not modified."""
        nxt, link, length, end = self._next, self._link, self._length, self._end
        cursor = self.cursor if start is None else start
        v, l, e = cursor.state, cursor.length, cursor.end
        for token in tokens:
            while v and token not in nxt[v]:
                v = link[v]
                l = length[v]
            u = nxt[v].get(token)
            if u is None:
                l, e = 0, -1
            else:
                v, l, e = u, l + 1, end[u]
        return Cursor(v, l, e)
