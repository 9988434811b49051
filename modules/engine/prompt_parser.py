"""A1111 prompt syntax: emphasis weights, prompt editing/alternation schedules,
composable ``AND`` prompts and ``<type:args>`` extra-network tags.

Pure Python (no torch) so the UI, the API and tests can use it cheaply; the
conditioning layer turns the results into embeddings.

The public names mirror A1111's ``modules/prompt_parser.py`` so extensions that
call them keep working; the typed variants (``ScheduledPrompt``,
``ExtraNetworkCall``) are what new code should use.

Two passes, as in A1111:

1. *Scheduling* (``get_learned_conditioning_prompt_schedules``) evaluates
   ``[from:to:when]`` and ``[a|b]`` into plain prompt strings per step range.
   Emphasis brackets are left in the text untouched at this stage.
2. *Attention* (``parse_prompt_attention``) turns one such string into
   ``[text, weight]`` fragments plus ``BREAK`` markers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Union

__all__ = [
    "ScheduledPrompt",
    "get_learned_conditioning_prompt_schedules",
    "get_prompt_schedule",
    "get_multicond_prompt_list",
    "parse_prompt_attention",
    "ExtraNetworkCall",
    "parse_extra_networks",
    "parse_extra_networks_prompts",
    "group_extra_networks",
    "BREAK_MARKER",
    "re_AND",
    "re_break",
]


# ---------------------------------------------------------------------------
# Prompt editing and alternation
# ---------------------------------------------------------------------------


class ScheduledPrompt(NamedTuple):
    """Prompt text in effect for sampling steps up to and including ``end_at_step``.

    A tuple, so A1111-style code doing ``for end, text in schedule`` or
    ``entry[1]`` works unchanged.
    """

    end_at_step: int
    text: str


@dataclass
class _Scheduled:
    before: list | None  # None: the "[to:when]" form, empty before the switch
    after: list
    when_text: str  # the NUMBER as written; "." in it decides fraction vs step
    when: int = 0  # resolved per call (depends on steps)


@dataclass
class _Alternate:
    options: list  # list of node lists, cycled one per step


_Node = Union[str, _Scheduled, _Alternate]

# lark's SIGNED_NUMBER, which is what A1111 accepts as `when`.
_NUMBER = r"[+-]?(?:\d+[eE][+-]?\d+|(?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?|\d+)"
_re_single_when = re.compile(r"\s*(" + _NUMBER + r")\s*")
_re_tail_when = re.compile(r"\s*(" + _NUMBER + r")\s*\]")

# Characters that end a plain run inside a bracketed construct.
_SPECIAL = set("\\[]():|")


class _ScheduleSyntaxError(Exception):
    """The prompt cannot be read as schedule syntax; A1111 then uses it verbatim."""


_STRAY = set("[]():")  # may stand alone as literal text, but only at the top level


def _run_split_offset(length: int) -> int:
    """Where A1111's parser (lark Earley) splits a trailing run of ``length``
    stray characters off the end of the prompt: the run's last ``length``
    characters (odd length) or all but its first one (even length).

    Measured on A1111's parser. The visible effect: when such a run starts with
    the closing bracket of a construct and has odd length, that bracket becomes
    literal text and so does the construct: ``"[a:b:3]:"`` is an edit,
    ``"[a:b:3]::"`` is not, ``"[a:b:3]:::"`` is again.
    """
    return 0 if length % 2 else 1


class _ScheduleParser:
    """Parser for A1111's prompt-editing grammar.

    Inside a construct everything must be well formed; only at the top level
    may ``( ) [ ] :`` stand alone as literal text. A top-level ``|`` (outside an
    alternation) or a dangling backslash makes the whole prompt unparseable, and
    A1111 then returns it verbatim without evaluating anything.

    A1111's grammar is ambiguous at the top level (``[a:3]`` is either an edit
    or five literal characters). Its parser resolves that from the end of the
    prompt backwards: a trailing well-formed item is kept as a construct, and a
    trailing run of stray characters is split off as described in
    ``_run_split_offset``. ``parse`` reproduces that choice.
    """

    def __init__(self, text: str):
        self.s = text
        self.n = len(text)
        self._constructs: dict[int, tuple[list[_Node], int] | None] = {}
        self._bar_owner_end: dict[int, int] = {}  # '|' position -> end of its alternation
        # A backslash escapes the next character (except a newline) wherever it
        # occurs, so escapes can be found without knowing the structure.
        self.escaped = [False] * (self.n + 1)
        i = 0
        while i < self.n:
            if text[i] == "\\" and i + 1 < self.n and text[i + 1] != "\n":
                self.escaped[i + 1] = True
                i += 2
            else:
                i += 1
        # Parse every construct innermost-first so the recursion stays shallow
        # however deeply brackets nest.
        for i in range(self.n - 1, -1, -1):
            if text[i] in "([" and not self.escaped[i]:
                self._construct(i)
        # A prefix s[:p] is readable unless it has a '|' whose alternation ends
        # after p, or a backslash that escapes nothing there. needed_end[p] is
        # how far the text must reach for s[:p]'s bars to be absorbed.
        self.needed_end = [0] * (self.n + 1)
        for i, c in enumerate(text):
            need = 0
            if not self.escaped[i]:
                if c == "|":
                    need = self._bar_owner_end.get(i, self.n + 1)
                elif c == "\\" and not self.escaped[i + 1]:
                    need = self.n + 1
            self.needed_end[i + 1] = max(self.needed_end[i], need)

    # -- well-formed pieces (deterministic) ---------------------------------

    def _prompt(self, i: int) -> tuple[list[_Node], int]:
        """Longest well-formed prompt starting at i; stops before a separator."""
        s, n = self.s, self.n
        out: list[_Node] = []
        start = i
        while i < n:
            c = s[i]
            if c == "\\":
                # an escape keeps both characters; the attention pass decodes it
                if i + 1 < n and s[i + 1] != "\n":
                    i += 2
                    continue
                break
            if c in "([":
                if start < i:
                    out.append(s[start:i])
                got = self._construct(i)
                if got is None:
                    return out, i
                nodes, i = got
                out.extend(nodes)
                start = i
                continue
            if c in _SPECIAL:
                break
            i += 1
        if start < i:
            out.append(s[start:i])
        return out, i

    def _construct(self, i: int) -> tuple[list[_Node], int] | None:
        if i not in self._constructs:
            self._constructs[i] = self._paren(i) if self.s[i] == "(" else self._square(i)
        return self._constructs[i]

    def _at(self, i: int) -> str:
        return self.s[i] if i < self.n else ""

    def _paren(self, i: int):
        # "(" prompt ")" or "(" prompt ":" prompt ")": kept verbatim here
        first, j = self._prompt(i + 1)
        if self._at(j) == ")":
            return ["(", *first, ")"], j + 1
        if self._at(j) == ":":
            second, k = self._prompt(j + 1)
            if self._at(k) == ")":
                return ["(", *first, ":", *second, ")"], k + 1
        return None

    def _square(self, i: int):
        first, j = self._prompt(i + 1)
        sep = self._at(j)
        if sep == "]":
            return ["[", *first, "]"], j + 1
        if sep == "|":
            options = [first]
            bars = []
            while self._at(j) == "|":
                bars.append(j)
                option, j = self._prompt(j + 1)
                options.append(option)
            if self._at(j) == "]":
                for bar in bars:
                    self._bar_owner_end[bar] = j + 1
                return [_Alternate(options)], j + 1
            return None
        if sep == ":":
            second, k = self._prompt(j + 1)
            nxt = self._at(k)
            if nxt == "]":
                # "[to:when]": the part after ':' must be just a number
                m = _re_single_when.fullmatch(self.s, j + 1, k)
                if m:
                    return [_Scheduled(None, first, m.group(1))], k + 1
                return None
            if nxt == ":":
                m = _re_tail_when.match(self.s, k + 1)
                if m:
                    return [_Scheduled(first, second, m.group(1))], m.end()
            return None
        return None

    # -- top level ------------------------------------------------------------

    def _valid_prefix(self, p: int) -> bool:
        """Whether s[:p] has any top-level reading (p is at a special character)."""
        # a backslash at p-1 escaping s[p] would dangle once s[p] is cut off
        return self.needed_end[p] <= p and not (p < self.n and self.escaped[p])

    def _is_stray(self, i: int) -> bool:
        return self.s[i] in _STRAY and not self.escaped[i]

    def parse(self) -> list[_Node]:
        if not self._valid_prefix(self.n):
            raise _ScheduleSyntaxError("no top-level reading")
        s = self.s
        ends: dict[int, int] = {}  # construct end -> start
        for i in range(self.n):
            if s[i] in "([" and not self.escaped[i]:
                got = self._construct(i)
                if got is not None:
                    ends[got[1]] = i

        pieces: list[list[_Node]] = []  # collected back to front
        e = self.n
        while e > 0:
            start = ends.get(e)
            if start is not None and s[e - 1] in ")]" and not self.escaped[e - 1]:
                pieces.append(self._constructs[start][0])
                e = start
            elif not self._is_stray(e - 1):
                j = e - 1  # a plain run (escapes included) ends here
                while j > 0 and not self._is_stray(j - 1):
                    j -= 1
                pieces.append([s[j:e]])
                e = j
            else:
                run_start = e - 1
                while run_start > 0 and self._is_stray(run_start - 1):
                    run_start -= 1
                # Split points whose prefix cannot be read (an alternation cut
                # in half) do not exist for the parser; the run effectively
                # starts at the first readable one.
                while run_start < e and not self._valid_prefix(run_start):
                    run_start += 1
                if run_start == e:
                    raise _ScheduleSyntaxError("no valid split")  # not expected
                k = run_start + _run_split_offset(e - run_start)
                pieces.append([s[k:e]])
                e = k
        out: list[_Node] = []
        for piece in reversed(pieces):
            out.extend(piece)
        return out


def _walk(nodes: list[_Node]):
    for node in nodes:
        if isinstance(node, _Scheduled):
            yield node
            if node.before is not None:
                yield from _walk(node.before)
            yield from _walk(node.after)
        elif isinstance(node, _Alternate):
            yield node
            for option in node.options:
                yield from _walk(option)


def _render(nodes: list[_Node], step: int, out: list[str]) -> None:
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Scheduled):
            if step <= node.when:
                if node.before is not None:
                    _render(node.before, step, out)
            else:
                _render(node.after, step, out)
        else:
            _render(node.options[(step - 1) % len(node.options)], step, out)


def get_prompt_schedule(
    prompt: str,
    steps: int,
    hires_steps: int | None = None,
    use_old_scheduling: bool = False,
) -> list[ScheduledPrompt]:
    """Schedule for one prompt; see ``get_learned_conditioning_prompt_schedules``."""
    # Which pass we are scheduling, and how `when` maps onto it (A1111 >= 1.6):
    # an integer is an absolute step counted over base+hires steps, a number
    # written with a "." is a fraction of the pass (1.0-2.0 is the hires pass).
    if hires_steps is None or use_old_scheduling:
        total, int_offset, frac_offset = steps, 0, 0.0
    else:
        total, int_offset, frac_offset = hires_steps, steps, 1.0

    try:
        return _schedule(prompt, total, int_offset, frac_offset, use_old_scheduling)
    except (_ScheduleSyntaxError, RecursionError):
        # RecursionError: nesting deeper than Python's stack; treat as plain text
        return [ScheduledPrompt(total, prompt)]


def _schedule(prompt: str, total: int, int_offset: int, frac_offset: float, use_old_scheduling: bool):
    tree = _ScheduleParser(prompt).parse()

    boundaries = {total}
    for node in _walk(tree):
        if isinstance(node, _Alternate):
            boundaries.update(range(1, total + 1))
            continue
        value = float(node.when_text)
        if use_old_scheduling:
            # pre-1.6 rule: anything below 1 is a fraction, otherwise a step
            if value < 1:
                value *= total
        elif "." in node.when_text:
            value = (value - frac_offset) * total
        else:
            value -= int_offset
        node.when = min(total, int(value))  # int() truncates toward zero, like A1111
        if node.when >= 1:
            boundaries.add(node.when)

    schedule = []
    for step in sorted(boundaries):
        parts: list[str] = []
        _render(tree, step, parts)
        schedule.append(ScheduledPrompt(step, "".join(parts)))
    return schedule


def get_learned_conditioning_prompt_schedules(
    prompts: Sequence[str],
    base_steps: int,
    hires_steps: int | None = None,
    use_old_scheduling: bool = False,
) -> list[list[ScheduledPrompt]]:
    """For each prompt, the ``(end_at_step, text)`` pairs A1111 would produce.

    ``"a [b:c:0.5] d"`` at 10 steps gives ``[(5, 'a b d'), (10, 'a c d')]``:
    step ``s`` uses the first entry whose ``end_at_step >= s``.

    Pass ``hires_steps`` to get the schedule of the hires-fix pass (its steps
    are numbered 1..hires_steps). Prompts that are not valid editing syntax come
    back unchanged as a single entry.
    """
    cache: dict[str, list[ScheduledPrompt]] = {}
    result = []
    for prompt in prompts:
        if prompt not in cache:
            cache[prompt] = get_prompt_schedule(prompt, base_steps, hires_steps, use_old_scheduling)
        result.append(list(cache[prompt]))
    return result


# ---------------------------------------------------------------------------
# Composable diffusion (AND)
# ---------------------------------------------------------------------------

re_AND = re.compile(r"\bAND\b")
_re_and_weight = re.compile(r"\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+))\s*$")


def get_multicond_prompt_list(
    prompts: Iterable[str],
) -> tuple[list[list[tuple[int, float]]], list[str], dict[str, int]]:
    """Split prompts on ``AND`` into weighted sub-prompts.

    Returns A1111's three values: per prompt a list of ``(index, weight)``, the
    flat list of distinct sub-prompt texts those indexes point into, and the
    text -> index map. A trailing ``:number`` on a sub-prompt is its weight
    (default 1.0); trailing whitespace is dropped, leading whitespace is kept,
    as A1111 does.
    """
    per_prompt: list[list[tuple[int, float]]] = []
    flat: list[str] = []
    index_of: dict[str, int] = {}
    for prompt in prompts:
        entries = []
        for part in re_AND.split(prompt):
            m = _re_and_weight.search(part)
            if m:
                text, weight = part[: m.start()], float(m.group(1))
            else:
                text, weight = part.rstrip(), 1.0
            if text not in index_of:
                index_of[text] = len(flat)
                flat.append(text)
            entries.append((index_of[text], weight))
        per_prompt.append(entries)
    return per_prompt, flat, index_of


# ---------------------------------------------------------------------------
# Attention / emphasis
# ---------------------------------------------------------------------------

BREAK_MARKER = "BREAK"
"""Fragment text of a chunk break; its weight is -1 (A1111's convention)."""

re_break = re.compile(r"\s*\bBREAK\b\s*", re.S)
_re_weight_close = re.compile(r":\s*([+-]?[.\d]+)\s*\)")
_re_text_run = re.compile(r"[^\\()\[\]:]+")
_ESCAPABLE = set("()[]\\")

_ROUND = 1.1
_SQUARE = 1 / 1.1


def parse_prompt_attention(text: str) -> list[list]:
    """Split an (already scheduled) prompt into ``[text, weight]`` fragments.

    ``(x)`` multiplies by 1.1, ``[x]`` divides by 1.1, ``(x:w)`` multiplies by
    ``w``; nesting multiplies. ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` give the
    literal character (any other backslash is dropped). A closer with no opener
    is literal text; an opener never closed applies to the rest of the prompt.
    ``BREAK`` as a word becomes ``["BREAK", -1]``. Adjacent fragments with equal
    weight are merged.

    Items are two-element lists like A1111's (so they unpack like tuples).
    Weights are computed with the same multiplication order as A1111, so the
    floats are bit-identical (``((x))`` is ``1.2100000000000002``).

    Bug-compatible: a ``BREAK`` inside brackets gets its -1 scaled like any
    other fragment (e.g. -1.1), and A1111 then no longer treats it as a break.
    """
    # Hand-written rather than A1111's re.finditer over re_attention: the same tokens in one pass
    # that reads each character once, and a malformed weight ("1.2.3") stays text where A1111 raises.
    scan = _AttentionScan()
    i = 0
    while i < len(text):
        i = scan.token(text, i)
    scan.close_unclosed()
    return _merge_equal_weights(scan.res) if scan.res else [["", 1.0]]


class _AttentionScan:
    """parse_prompt_attention's state: the fragments so far and where each open bracket began."""

    def __init__(self) -> None:
        self.res: list[list] = []
        self.round_open: list[int] = []     # index into res where each unclosed "(" began
        self.square_open: list[int] = []

    def token(self, text: str, i: int) -> int:
        """Read the token at `i`; returns where the next one starts."""
        c = text[i]
        if c == "\\":
            return self._escape(text, i)
        if c == "(":
            self.round_open.append(len(self.res))
        elif c == "[":
            self.square_open.append(len(self.res))
        elif c == ":":
            return self._colon(text, i)
        elif c == ")":
            self._close(self.round_open, _ROUND, ")")
        elif c == "]":
            self._close(self.square_open, _SQUARE, "]")
        else:
            m = _re_text_run.match(text, i)
            self.add_text(m.group(0))
            return m.end()
        return i + 1

    def _escape(self, text: str, i: int) -> int:
        if i + 1 < len(text) and text[i + 1] in _ESCAPABLE:
            self.res.append([text[i + 1], 1.0])
            return i + 2
        self.res.append(["", 1.0])  # a lone backslash vanishes
        return i + 1

    def _colon(self, text: str, i: int) -> int:
        m = _re_weight_close.match(text, i)
        if m:
            weight = _to_float(m.group(1))
            if self.round_open and weight is not None:
                self.scale_from(self.round_open.pop(), weight)
                return m.end()
            if weight is not None:
                self.add_text(m.group(0))  # ":1.5)" with nothing to close is text
                return m.end()
            # unparsable number like "1.2.3": A1111 raises here; we keep the
            # colon as text and carry on
        self.add_text(":")
        return i + 1

    def _close(self, opened: list[int], factor: float, char: str) -> None:
        if opened:
            self.scale_from(opened.pop(), factor)
        else:
            self.add_text(char)  # a closer with no opener is text

    def scale_from(self, start: int, factor: float) -> None:
        for item in self.res[start:]:
            item[1] *= factor

    def add_text(self, chunk: str) -> None:
        for n, part in enumerate(re_break.split(chunk)):
            if n:
                self.res.append([BREAK_MARKER, -1])
            self.res.append([part, 1.0])

    def close_unclosed(self) -> None:
        # Unclosed openers reach to the end: round ones first, then square, in
        # opening order (the order matters for the exact float results).
        for start in self.round_open:
            self.scale_from(start, _ROUND)
        for start in self.square_open:
            self.scale_from(start, _SQUARE)


def _merge_equal_weights(res: list[list]) -> list[list]:
    merged = [res[0]]
    for item in res[1:]:
        if item[1] == merged[-1][1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return merged


def _to_float(s: str) -> float | None:
    try:
        return float(s)
    except ValueError:
        return None


# ---------------------------------------------------------------------------
# Extra networks: <lora:name:0.8>, <hypernet:name:1>, <lyco:...>, ...
# ---------------------------------------------------------------------------

_re_extra_network = re.compile(r"<(\w+):([^>]+)>")


@dataclass
class ExtraNetworkCall:
    """One ``<name:arg1:arg2...>`` tag: ``name`` is the network type (``lora``),
    ``items`` the ``:``-separated arguments as written."""

    name: str
    items: list[str] = field(default_factory=list)

    @property
    def positional(self) -> list[str]:
        return [x for x in self.items if "=" not in x]

    @property
    def named(self) -> dict[str, str]:
        out = {}
        for x in self.items:
            if "=" in x:
                key, value = x.split("=", 1)
                out[key] = value
        return out


def parse_extra_networks(
    prompt: str, allowed: Iterable[str] | None = None
) -> tuple[str, list[ExtraNetworkCall]]:
    """Remove ``<type:args>`` tags from ``prompt`` and return them in order.

    As in A1111 every tag of that shape is removed (unknown types are reported
    later, by whoever activates networks). Pass ``allowed`` to remove only
    those types and leave other tags in the text.
    """
    calls: list[ExtraNetworkCall] = []
    allowed_set = set(allowed) if allowed is not None else None

    def take(m: re.Match) -> str:
        if allowed_set is not None and m.group(1) not in allowed_set:
            return m.group(0)
        calls.append(ExtraNetworkCall(m.group(1), m.group(2).split(":")))
        return ""

    return _re_extra_network.sub(take, prompt), calls


def parse_extra_networks_prompts(
    prompts: Iterable[str], allowed: Iterable[str] | None = None
) -> tuple[list[str], list[ExtraNetworkCall]]:
    """Strip tags from every prompt of a batch; like A1111, the networks that
    get activated are the ones from the first prompt."""
    cleaned: list[str] = []
    first: list[ExtraNetworkCall] | None = None
    for prompt in prompts:
        text, calls = parse_extra_networks(prompt, allowed)
        cleaned.append(text)
        if first is None:
            first = calls
    return cleaned, first or []


def group_extra_networks(calls: Iterable[ExtraNetworkCall]) -> dict[str, list[ExtraNetworkCall]]:
    """``{"lora": [call, ...], ...}``, the shape A1111 hands to each network."""
    grouped: dict[str, list[ExtraNetworkCall]] = {}
    for call in calls:
        grouped.setdefault(call.name, []).append(call)
    return grouped
