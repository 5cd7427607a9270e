"""The regimen string grammar: a hand-written tokenizer, a recursive-descent parser and the canonical formatter.

Case-insensitive and whitespace-tolerant (``q12h`` = ``Q 12 H``). A time without a unit is in hours.

EBNF (``NUMBER``: ``12``, ``0.5``, ``.5``, ``1e-3``; words are case-insensitive)::

    regimen     = phase { separator phase } [ "," shared ] ;
    separator   = [ "," ] ( "then" | "followed" "by" ) | "," | ";" ;
    phase       = [ "start" time [ ":" ] ] NUMBER unit { modifier } ;
    unit        = mass [ "/" "kg" ] ;
    mass        = "ng" | "ug" | "mcg" | "µg" | "μg" | "mg" | "g" ;
    modifier    = route | schedule | count | "over" time | rate | "lag" time | "at" time ;
    route       = "bolus" | "iv" [ "bolus" | "push" ] | [ "iv" ] ( "infusion" | "inf" ) [ infusion ]
                | "oral" | "po" ;
    infusion    = time | "over" time | rate ;
    rate        = "rate" NUMBER unit "/" time_unit ;          (per kg exactly when the amount is)
    schedule    = ( "q" | "every" ) time | "qd" | "daily" | "bid" | "tid" | "qid" | "once" | "loading" ;
    count       = ( "x" | "×" ) NUMBER [ "dose" | "doses" | "times" | time_unit ] | "for" time ;
    time        = NUMBER [ time_unit ] ;
    time_unit   = "min" | "mins" | "minute" | "minutes" | "h" | "hr" | "hrs" | "hour" | "hours"
                | "d" | "day" | "days" | "w" | "wk" | "week" | "weeks" ;
    shared      = shared_mod { [ "," ] shared_mod } ;
    shared_mod  = route | "over" time | rate | "lag" time ;    (every phase that does not set it takes it)
    NUMBER      = ( digits [ "." [ digits ] ] | "." digits ) [ ( "e" | "E" ) [ "+" | "-" ] digits ] ;

Tokens: numbers, words (runs of letters, so ``q12h`` is ``q`` ``12`` ``h`` but ``mgq`` is one unknown word) and
``, ; : /``. Each modifier kind (route, schedule, count, lag, start/at, duration, rate) at most once per phase.

Semantics: ``qd``/``daily`` = q24h, ``bid`` = q12h, ``tid`` = q8h, ``qid`` = q6h; ``x N`` = N doses; ``x 7 d`` and
``for 7 days`` = as many doses as fit in 7 days (7·24/τ, a whole number); ``once``/``loading`` = a single dose;
``at T`` = ``start T:`` (time of the phase's first dose); ``over`` / ``rate`` make the phase an infusion. A comma
followed by a number, ``start`` or ``then`` starts a new phase; a comma followed by anything else opens the shared
clause, which must end the text. See docs/regimens.md for the canonical form each example parses to.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nlmefit.errors import ModelSpecError

__all__ = ["RegimenSyntaxError", "Token", "ParsedPhase", "tokenize", "parse_regimen", "format_regimen",
           "MASS_UNITS", "TIME_UNITS", "format_number", "format_time"]

#: mg per unit of mass
MASS_UNITS = {"ng": 1e-6, "ug": 1e-3, "mg": 1.0, "g": 1e3}
MASS_ALIASES = {"mcg": "ug", "µg": "ug", "μg": "ug"}
#: hours per time unit as (numerator, denominator), so that minutes convert as v / 60 exactly
TIME_UNITS = {**{u: (1, 60) for u in ("min", "mins", "minute", "minutes")},
              **{u: (1, 1) for u in ("h", "hr", "hrs", "hour", "hours")},
              **{u: (24, 1) for u in ("d", "day", "days")},
              **{u: (168, 1) for u in ("w", "wk", "week", "weeks")}}
ALIAS_INTERVALS = {"qd": 24.0, "daily": 24.0, "bid": 12.0, "tid": 8.0, "qid": 6.0}
ROUTE_WORDS = {"bolus", "iv", "infusion", "inf", "oral", "po"}
SCHEDULE_WORDS = {"q", "every", "once", "loading", *ALIAS_INTERVALS}
MODIFIER_WORDS = ROUTE_WORDS | SCHEDULE_WORDS | {"x", "for", "over", "rate", "lag", "at"}
SHARED_KEYS = {"route", "duration", "rate", "lag"}
_NUM = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_MAX_DOSES = 1_000_000


class RegimenSyntaxError(ModelSpecError):
    """A regimen string does not follow the grammar; ``pos``/``token`` locate the offence, ``expected`` says
    what would have been accepted there."""

    def __init__(self, text: str, pos: int, token: str, expected: str):
        self.text, self.pos, self.token, self.expected = text, pos, token, expected
        found = "end of text" if token == "" else repr(token)
        super().__init__(f"regimen {text!r}: at position {pos} ({found}): expected {expected}")


@dataclass(frozen=True)
class Token:
    kind: str  # "num", "word", "punct" or "end"
    text: str  # as written
    value: Any  # float for numbers, lower-case text otherwise
    pos: int  # 0-based character offset


@dataclass
class ParsedPhase:
    fields: dict  # Phase keyword arguments (start None = default)
    pos: int  # where the phase starts in the text
    snippet: str  # the phase's text


def tokenize(text: str) -> list[Token]:
    """Numbers, words (letters only, lower-cased) and the punctuation ``, ; : /``; ``×`` reads as ``x``."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif "0" <= c <= "9" or (c == "." and i + 1 < n and "0" <= text[i + 1] <= "9"):
            m = _NUM.match(text, i)
            out.append(Token("num", m.group(), float(m.group()), i))
            i = m.end()
        elif c.isalpha():
            j = i
            while j < n and text[j].isalpha():
                j += 1
            out.append(Token("word", text[i:j], text[i:j].lower(), i))
            i = j
        elif c in ",;:/":
            out.append(Token("punct", c, c, i))
            i += 1
        elif c == "×":
            out.append(Token("word", c, "x", i))
            i += 1
        else:
            raise RegimenSyntaxError(text, i, c, "a number, a word or one of , ; : /")
    out.append(Token("end", "", None, n))
    return out


class _Parser:
    def __init__(self, text: str):
        self.text, self.toks, self.i = text, tokenize(text), 0

    # ---- token helpers
    def peek(self, k: int = 0) -> Token:
        return self.toks[min(self.i + k, len(self.toks) - 1)]

    def next(self) -> Token:
        t = self.peek()
        self.i += 1
        return t

    def is_word(self, *words: str, k: int = 0) -> bool:
        t = self.peek(k)
        return t.kind == "word" and t.value in words

    def fail(self, expected: str, tok: Token | None = None):
        t = tok or self.peek()
        raise RegimenSyntaxError(self.text, t.pos, t.text, expected)

    def number(self, what: str) -> float:
        if self.peek().kind != "num":
            self.fail(what)
        return self.next().value

    def time(self, what: str) -> float:
        v = self.number(what)
        num, den = TIME_UNITS.get(self.next().value, (1, 1)) if self.is_word(*TIME_UNITS) else (1, 1)
        return v * num / den if (num, den) != (1, 1) else v

    def unit(self) -> str:
        t = self.peek()
        if t.kind != "word" or (t.value not in MASS_UNITS and t.value not in MASS_ALIASES):
            self.fail("an amount unit (ng, ug, mcg, mg, g, optionally /kg)")
        mass = MASS_ALIASES.get(self.next().value, t.value)
        if self.peek().value == "/" and self.is_word("kg", k=1):
            self.i += 2
            return mass + "/kg"
        return mass

    # ---- grammar
    def regimen(self) -> list[ParsedPhase]:
        phases, shared = [self.phase()], None
        while True:
            t = self.peek()
            if t.kind == "end":
                break
            if t.value == ",":
                nxt = self.peek(1)
                if nxt.kind == "num" or (nxt.kind == "word" and nxt.value in ("start", "then", "followed")):
                    self.next()
                    if self.is_word("then"):
                        self.next()
                    elif self.is_word("followed"):
                        if not self.is_word("by", k=1):
                            self.fail("'by' after 'followed'", self.peek(1))
                        self.i += 2
                    phases.append(self.phase())
                    continue
                self.next()
                shared = self.shared()
                if self.peek().kind != "end":
                    self.fail("end of text (a clause after ',' that is not a new phase applies to every phase "
                              "and must come last)")
                break
            if t.value == ";" or self.is_word("then"):
                self.next()
            elif self.is_word("followed"):
                if not self.is_word("by", k=1):
                    self.fail("'by' after 'followed'", self.peek(1))
                self.i += 2
            else:
                self.fail("a modifier (route, q<interval>, x<count>, over, rate, lag, at), ',', ';', 'then' "
                          "or end of text")
            phases.append(self.phase())
        for p in phases:
            self.apply_shared(p.fields, shared or {})
        return phases

    def phase(self) -> ParsedPhase:
        first = self.peek()
        f: dict = {}
        if self.is_word("start"):
            self.next()
            f["start"] = self.time("a start time (e.g. 'start 24h:')")
            if self.peek().value == ":":
                self.next()
        f["amount"] = self.number("a dose amount (a number)" if "start" not in f else "a dose amount after the "
                                  "start time")
        f["unit"] = self.unit()
        count = None
        while self.peek().kind == "word" and self.peek().value in MODIFIER_WORDS:
            count = self.modifier(f, count) or count
        if count is not None:
            f["n_doses"] = self.resolve_count(f, count)
        if "rate" in f:
            f["rate"] = self.convert_rate(f["rate"], f["unit"])
        end = self.peek().pos
        return ParsedPhase(f, first.pos, self.text[first.pos:end].strip())

    def put(self, f: dict, key: str, value, tok: Token, what: str):
        if key in f:
            self.fail(f"at most one {what} per phase", tok)
        f[key] = value

    def modifier(self, f: dict, count):
        t = self.next()
        w = t.value
        if w in ROUTE_WORDS:
            infusion = w in ("infusion", "inf")
            if w == "iv" and self.is_word("bolus", "push", "infusion", "inf"):
                infusion = self.next().value in ("infusion", "inf")
            route = "infusion" if infusion else ("oral" if w in ("oral", "po") else "bolus")
            self.put(f, "route", route, t, "route")
            if infusion and self.peek().kind == "num":
                self.put(f, "duration", self.time("an infusion duration"), t, "infusion duration")
        elif w in ALIAS_INTERVALS:
            self.put(f, "interval", ALIAS_INTERVALS[w], t, "schedule (q<interval>, qd/bid/tid/qid, once)")
        elif w in ("q", "every"):
            self.put(f, "interval", self.time("a dosing interval after 'q' (e.g. q12h)"), t,
                     "schedule (q<interval>, qd/bid/tid/qid, once)")
        elif w in ("once", "loading"):
            if count is not None:
                self.fail("a single dose ('once') without a dose count", t)
            self.put(f, "interval", None, t, "schedule (q<interval>, qd/bid/tid/qid, once)")
            self.put(f, "n_doses", 1, t, "dose count")
        elif w in ("x", "for"):
            if count is not None or "n_doses" in f:
                self.fail("at most one dose count per phase", t)
            if w == "for":
                return ("hours", self.time("a treatment length after 'for' (e.g. for 7 days)"), t)
            num = self.peek()
            v = self.number("a number of doses after 'x' (e.g. x14) or a length (x7d)")
            if self.is_word(*TIME_UNITS):
                a, b = TIME_UNITS[self.next().value]
                return ("hours", v * a / b if (a, b) != (1, 1) else v, t)
            if self.is_word("dose", "doses", "times"):
                self.next()
            return ("n", v, num)
        elif w == "over":
            self.put(f, "duration", self.time("an infusion duration after 'over'"), t, "infusion duration")
        elif w == "rate":
            self.put(f, "rate", self.rate(f), t, "infusion rate")
        elif w == "lag":
            self.put(f, "lag", self.time("a lag time after 'lag'"), t, "lag")
        elif w == "at":
            self.put(f, "start", self.time("a dose time after 'at'"), t, "start time ('start T:' or 'at T')")
        return None

    def rate(self, f: dict) -> tuple:
        v = self.number("a rate after 'rate' (e.g. rate 2 g/h)")
        ut = self.peek()
        unit = self.unit()
        if self.peek().value != "/" or not self.is_word(*TIME_UNITS, k=1):
            self.fail("'/' and a time unit after the rate's amount unit (e.g. mg/h)")
        self.next()
        a, b = TIME_UNITS[self.next().value]
        return (v * b / a if (a, b) != (1, 1) else v, unit, ut)

    def convert_rate(self, rate: tuple, mine: str) -> float:
        """A parsed rate (per hour, in its own unit) in the phase's amount unit per hour."""
        per_h, unit, tok = rate
        if unit.endswith("/kg") != mine.endswith("/kg"):
            self.fail(f"a rate unit per kg exactly when the amount is (here {mine}/h)", tok)
        if unit != mine:
            per_h = per_h * MASS_UNITS[unit.split("/")[0]] / MASS_UNITS[mine.split("/")[0]]
        return per_h

    def resolve_count(self, f: dict, count) -> int:
        kind, v, tok = count
        if kind == "n":
            if not (math.isfinite(v) and v == int(v) and 1 <= v <= _MAX_DOSES):
                self.fail(f"a whole number of doses from 1 to {_MAX_DOSES}", tok)
            return int(v)
        tau = f.get("interval")
        if tau is None or not (math.isfinite(tau) and tau > 0):
            self.fail("a dosing interval (q<interval>) in the same phase: a treatment length needs one", tok)
        n = v / tau
        r = round(n) if math.isfinite(n) else -1
        if not (1 <= r <= _MAX_DOSES and abs(n - r) <= 1e-9 * max(1.0, r)):
            self.fail(f"a treatment length that is a whole number (1 to {_MAX_DOSES}) of dosing intervals "
                      f"({format_time(tau)}); got {format_number(v)} h / {format_number(tau)} h = {n:g}", tok)
        return int(r)

    def shared(self) -> dict:
        f: dict = {}
        while True:
            t = self.peek()
            if not (t.kind == "word" and t.value in ROUTE_WORDS | {"over", "rate", "lag"}):
                self.fail("a route (bolus, iv, infusion, oral, po), over, rate or lag (a clause after the last "
                          "phase applies to every phase)")
            self.modifier(f, None)
            if self.peek().value == "," and self.peek(1).kind == "word":
                self.next()
            elif self.peek().kind == "end":
                return f


    def apply_shared(self, f: dict, shared: dict) -> None:
        """Fill what a phase leaves unset from the shared clause; 'over'/'rate' alone imply an infusion."""
        if ("duration" in f or "rate" in f) and "route" not in f:
            f["route"] = "infusion"
        if "route" not in f and "route" in shared:
            f["route"] = shared["route"]
        if f.get("route") == "infusion" and "duration" not in f and "rate" not in f:
            if "duration" in shared:
                f["duration"] = shared["duration"]
            if "rate" in shared:
                f["rate"] = self.convert_rate(shared["rate"], f["unit"])
        if "lag" not in f and "lag" in shared:
            f["lag"] = shared["lag"]


def parse_regimen(text: str) -> list[ParsedPhase]:
    """Parse ``text`` into phase keyword arguments; raise :class:`RegimenSyntaxError` on the first offence."""
    if not isinstance(text, str):
        raise ModelSpecError(f"regimen: expected a string, got {type(text).__name__}")
    return _Parser(text).regimen()


def format_number(x: float) -> str:
    """Shortest text that parses back to exactly ``x`` (``500``, ``0.1``, ``1e-05``)."""
    x = float(x)
    return str(int(x)) if x.is_integer() and abs(x) < 1e16 else repr(x)


def format_time(h: float) -> str:
    """Hours as canonical text: whole minutes below one hour (``30min``), hours otherwise (``12h``)."""
    if 0 < h < 1:
        m = h * 60
        if m.is_integer() and m / 60 == h:
            return f"{format_number(m)}min"
    return f"{format_number(h)}h"


def format_regimen(phases: Sequence, default_start: Sequence[bool]) -> str:
    """The canonical string of resolved phases (objects with Phase's attributes)."""
    parts = []
    for k, p in enumerate(phases):
        s = [format_number(p.amount), p.unit, p.route]
        if p.route == "infusion":
            s.append(f"over {format_time(p.duration)}" if p.duration is not None
                     else f"rate {format_number(p.rate)} {p.unit}/h")
        prefix = ""
        if p.interval is None:
            nxt_default = default_start[k + 1] if k + 1 < len(phases) else None
            if not default_start[k] or nxt_default is False:
                s.append(f"at {format_time(p.start)}")
            else:
                s.append("loading" if nxt_default else "once")
        else:
            s.append(f"q{format_time(p.interval)} x{p.n_doses}")
            if not default_start[k]:
                prefix = f"start {format_time(p.start)}: "
        if p.lag:
            s.append(f"lag {format_time(p.lag)}")
        parts.append(prefix + " ".join(s))
    return " then ".join(parts)
