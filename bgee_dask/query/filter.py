"""The cell filter language: a small, safe ``value_filter`` over cell metadata columns.

Users type filters such as ``cellTypeId == 'CL:0000236' and sex in ['female', 'male']``. The
text comes from outside, so it is tokenised and parsed here by a hand-written recursive-descent
parser into an immutable AST; nothing is ever handed to ``eval``, ``DataFrame.query`` or
``DataFrame.eval``, and a filter can only compare columns with literals.

Grammar (keywords ``and or not in True False`` are case-insensitive)::

    filter    := or_expr
    or_expr   := and_expr ("or" and_expr)*
    and_expr  := unary ("and" unary)*
    unary     := "not" unary | "(" or_expr ")" | predicate
    predicate := column ("==" | "!=" | "<" | "<=" | ">" | ">=") literal
               | column ["not"] "in" "[" [literal ("," literal)* [","]] "]"
    column    := [A-Za-z_][A-Za-z0-9_.]*  |  `back-quoted name`   (\\` and \\\\ escape inside)
    literal   := 'string' | "string"  (only \\' \\" \\\\ escapes)  |  integer | float | True | False

The column is always on the left. Positions in error messages are 0-based character offsets.

Missing values (NaN, None, ``pd.NA``, categorical code -1) follow SQL: a comparison with a
missing value is neither true nor false, so a row whose value is missing matches *no*
predicate on that column -- not ``==``, not ``!=``, not ``in``, not ``not in`` -- and ``not``
does not bring it back: ``not (x == 'a')`` means exactly ``x != 'a'`` and also excludes rows
where ``x`` is missing (Kleene three-valued logic, implemented by pushing ``not`` down to the
predicates). There is deliberately no way to select missing values.

Types are never coerced silently: a numeric column compares with numbers only (``speciesId ==
'9606'`` is an error), a string or string-categorical column with strings only, a boolean
column with ``True``/``False`` and only by (in)equality. Ordering on strings is lexicographic by
value, also for ordered categoricals (their category order is ignored). A categorical compared
with a value that is not among its categories simply does not match. Categorical columns are
evaluated on their categories and mapped through the codes, so the cost per row is one lookup.
A column with no values at all (all-missing object column, categorical without categories,
as read for an experiment lacking the column) matches nothing and accepts any literal; an
object column mixing value types only supports ``==``, ``!=``, ``in`` and ``not in``.
"""

from __future__ import annotations

import difflib
import operator
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from pandas.api.extensions import ExtensionArray, ExtensionDtype

from bgee_dask.schema import BgeeInputError, InputKeyError, InputTypeError, value_kind

__all__ = [
    "PARTIAL_FALSE",
    "PARTIAL_TRUE",
    "PARTIAL_UNKNOWN",
    "And",
    "Compare",
    "Expr",
    "FilterSyntaxError",
    "FilterTypeError",
    "IsIn",
    "Not",
    "Or",
    "UnknownColumnError",
    "Value",
    "check_columns",
    "evaluate",
    "evaluate_partial",
    "parse_filter",
]

Value = str | int | float | bool
"""A literal: what a column may be compared with."""

COMPARISON_OPS: tuple[str, ...] = ("==", "!=", "<", "<=", ">", ">=")
_ORDERING_OPS = frozenset({"<", "<=", ">", ">="})
_NEGATED_OP = {"==": "!=", "!=": "==", "<": ">=", ">=": "<", ">": "<=", "<=": ">"}
_MIRRORED_OP = {"==": "==", "!=": "!=", "<": ">", ">": "<", "<=": ">=", ">=": "<="}
_OP_FUNCS: dict[str, Callable[[Any, Any], Any]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}

_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_NUMBER_RE = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
_KEYWORDS = frozenset({"and", "or", "not", "in", "true", "false"})
_MAX_DEPTH = 100  # parentheses/not nesting; bounds recursion on hostile input
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1  # what any integer column could hold

PARTIAL_TRUE = 1
"""evaluate_partial: every cell of the run matches."""
PARTIAL_FALSE = 0
"""evaluate_partial: no cell of the run matches."""
PARTIAL_UNKNOWN = -1
"""evaluate_partial: the catalog cannot tell; the cells must be looked at."""


# --------------------------------------------------------------------------- errors


class FilterSyntaxError(BgeeInputError):
    """The filter text is not in the language; carries ``text`` and 0-based ``position``."""

    def __init__(self, text: str, position: int, reason: str):
        self.text = text
        self.position = position
        self.reason = reason
        super().__init__(f"filter syntax error at position {position}: {reason}\n{_caret(text, position)}")


class UnknownColumnError(InputKeyError):
    """The filter names columns the data lacks; ``suggestions`` maps each to close matches.

    A KeyError because a column is looked up, a ValueError because the filter is what is wrong;
    callers may catch either.
    """

    def __init__(self, columns: Sequence[str], available: Iterable[Any]):
        names = sorted({str(a) for a in available})
        self.columns = tuple(columns)
        self.suggestions = {c: _close_matches(c, names) for c in self.columns}
        parts = []
        for c in self.columns:
            hint = self.suggestions[c]
            parts.append(f"{c!r}" + (f" (did you mean {' or '.join(repr(h) for h in hint)}?)" if hint else ""))
        message = f"unknown column{'s' if len(self.columns) > 1 else ''} {', '.join(parts)}"
        if not any(self.suggestions.values()):
            shown = ", ".join(repr(n) for n in names[:30]) + (", ..." if len(names) > 30 else "")
            message += f"; available columns: {shown}" if names else "; there are no columns"
        super().__init__(message)

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class FilterTypeError(BgeeInputError):
    """A literal cannot be compared with a column's values; ``column`` names the column."""

    def __init__(self, column: str, message: str):
        self.column = column
        super().__init__(message)


def _close_matches(name: str, names: list[str]) -> list[str]:
    same_case = [n for n in names if n.lower() == name.lower()]
    rest = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    return list(dict.fromkeys(same_case + rest))[:3]


def _caret(text: str, position: int) -> str:
    """The offending line of ``text`` with a caret under ``position`` (long lines are windowed)."""
    start = text.rfind("\n", 0, position) + 1
    end = text.find("\n", position)
    line = text[start : end if end >= 0 else len(text)]
    col = position - start
    prefix = suffix = ""
    if len(line) > 100:
        lo = max(0, min(col - 50, len(line) - 100))
        prefix = "..." if lo > 0 else ""
        suffix = "..." if lo + 100 < len(line) else ""
        line, col = line[lo : lo + 100], col - lo + len(prefix)
    shown = prefix + "".join(ch if ch == "\t" or ch.isprintable() else " " for ch in line) + suffix
    pad = "".join("\t" if ch == "\t" else " " for ch in shown[:col])
    return f"    {shown}\n    {pad}^"


# --------------------------------------------------------------------------- AST


def _check_value(value: Any) -> Value:
    """Literals are plain Python scalars so that equality, hashing and rendering are exact."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not np.isfinite(value):
            raise ValueError(f"a filter literal must be a finite number, not {value!r}")
        return value
    raise TypeError(f"a filter literal must be str, int, float or bool, not {type(value).__name__}")


def _typed(value: Value) -> tuple[type, Value]:
    # 1 == 1.0 == True in Python, but they are different literals (and render differently)
    return (type(value), value)


class Expr:
    """A parsed filter. Immutable and hashable; ``str()`` gives canonical text that re-parses equal.

    ``&``, ``|`` and ``~`` build ``And``/``Or``/``Not`` so callers can combine filters without
    pasting strings together.
    """

    __slots__ = ()

    def columns(self) -> frozenset[str]:
        """Every column the filter reads: what must be loaded, and what must exist."""
        raise NotImplementedError

    def _key(self) -> tuple:
        raise NotImplementedError

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self._key() == other._key()  # type: ignore[attr-defined]

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._key()))

    def __str__(self) -> str:
        return _render(self)

    def __and__(self, other: Expr) -> And:
        left = self.items if isinstance(self, And) else (self,)
        right = other.items if isinstance(other, And) else (other,)
        return And(left + right)

    def __or__(self, other: Expr) -> Or:
        left = self.items if isinstance(self, Or) else (self,)
        right = other.items if isinstance(other, Or) else (other,)
        return Or(left + right)

    def __invert__(self) -> Not:
        return Not(self)


@dataclass(frozen=True, eq=False, slots=True)
class Compare(Expr):
    """``column op value``."""

    column: str
    op: str
    value: Value

    def __post_init__(self) -> None:
        if not isinstance(self.column, str) or not self.column:
            raise ValueError("a column name must be a non-empty string")
        if self.op not in COMPARISON_OPS:
            raise ValueError(f"unknown comparison operator {self.op!r}; expected one of {', '.join(COMPARISON_OPS)}")
        object.__setattr__(self, "value", _check_value(self.value))

    def columns(self) -> frozenset[str]:
        return frozenset((self.column,))

    def _key(self) -> tuple:
        return (self.column, self.op, _typed(self.value))


@dataclass(frozen=True, eq=False, slots=True)
class IsIn(Expr):
    """``column in [values]`` (or ``not in`` when ``negate``)."""

    column: str
    values: tuple[Value, ...]
    negate: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.column, str) or not self.column:
            raise ValueError("a column name must be a non-empty string")
        if isinstance(self.values, (str, bytes)):
            raise TypeError("IsIn.values must be a sequence of literals, not a single string")
        object.__setattr__(self, "values", tuple(_check_value(v) for v in self.values))
        object.__setattr__(self, "negate", bool(self.negate))

    def columns(self) -> frozenset[str]:
        return frozenset((self.column,))

    def _key(self) -> tuple:
        return (self.column, tuple(_typed(v) for v in self.values), self.negate)


def _check_items(items: Iterable[Expr], what: str) -> tuple[Expr, ...]:
    items = tuple(items)
    if not items:
        raise ValueError(f"{what} needs at least one operand")
    for item in items:
        if not isinstance(item, Expr):
            raise TypeError(f"{what} operands must be Expr, not {type(item).__name__}")
    return items


@dataclass(frozen=True, eq=False, slots=True)
class And(Expr):
    """All ``items`` hold. The parser only builds it with two or more items."""

    items: tuple[Expr, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "items", _check_items(self.items, "And"))

    def columns(self) -> frozenset[str]:
        return frozenset().union(*(i.columns() for i in self.items))

    def _key(self) -> tuple:
        return self.items


@dataclass(frozen=True, eq=False, slots=True)
class Or(Expr):
    """At least one of ``items`` holds. The parser only builds it with two or more items."""

    items: tuple[Expr, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "items", _check_items(self.items, "Or"))

    def columns(self) -> frozenset[str]:
        return frozenset().union(*(i.columns() for i in self.items))

    def _key(self) -> tuple:
        return self.items


@dataclass(frozen=True, eq=False, slots=True)
class Not(Expr):
    """``item`` does not hold (with missing values matching neither; see the module docstring)."""

    item: Expr

    def __post_init__(self) -> None:
        _check_items((self.item,), "Not")

    def columns(self) -> frozenset[str]:
        return self.item.columns()

    def _key(self) -> tuple:
        return (self.item,)


def _render_column(name: str) -> str:
    if _IDENT_RE.fullmatch(name) and name.lower() not in _KEYWORDS:
        return name
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def _render_value(value: Value) -> str:
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, (int, float)):
        return repr(value)  # repr(float) round-trips exactly and always has '.', 'e' or is inf (rejected)
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _render(expr: Expr) -> str:
    if isinstance(expr, Compare):
        return f"{_render_column(expr.column)} {expr.op} {_render_value(expr.value)}"
    if isinstance(expr, IsIn):
        op = "not in" if expr.negate else "in"
        return f"{_render_column(expr.column)} {op} [{', '.join(_render_value(v) for v in expr.values)}]"
    if isinstance(expr, Not):
        inner = _render(expr.item)
        return f"not {inner}" if isinstance(expr.item, (Compare, IsIn, Not)) else f"not ({inner})"
    if isinstance(expr, And):
        # a nested And keeps its parentheses so that the re-parsed tree is the same tree
        return " and ".join(f"({_render(i)})" if isinstance(i, (And, Or)) else _render(i) for i in expr.items)
    if isinstance(expr, Or):
        return " or ".join(f"({_render(i)})" if isinstance(i, Or) else _render(i) for i in expr.items)
    raise TypeError(f"not a filter expression: {expr!r}")


# --------------------------------------------------------------------------- tokenizer


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # ident | literal | op | and | or | not | in | ( | ) | [ | ] | , | end
    value: Any
    pos: int
    text: str

    def describe(self) -> str:
        if self.kind == "end":
            return "end of input"
        text = self.text if len(self.text) <= 40 else self.text[:37] + "..."
        if self.kind == "ident":
            return f"column name {text}" if text.startswith("`") else f"column name '{text}'"
        if self.kind == "literal":
            what = "string" if isinstance(self.value, str) else "boolean" if isinstance(self.value, bool) else "number"
            return f"{what} {text}"
        return f"'{text}'"


_PUNCT = {"(": "(", ")": ")", "[": "[", "]": "]", ",": ","}
_BAD_CHARS = {
    "&": "use 'and'",
    "|": "use 'or'",
    "!": "use 'not' or '!='",
    ";": "a filter is a single expression",
}


def _scan_quoted(text: str, start: int, quote: str, escapable: str, what: str) -> tuple[str, int]:
    """The unescaped content of a quoted run starting at ``start`` and the position after it."""
    out: list[str] = []
    i = start + 1
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == quote:
            return "".join(out), i + 1
        if ch == "\\":
            if i + 1 >= n:
                break
            nxt = text[i + 1]
            if nxt not in escapable:
                allowed = " ".join("\\" + e for e in escapable)
                raise FilterSyntaxError(text, i, f"invalid escape '\\{nxt}' in {what} (only {allowed} are allowed)")
            out.append(nxt)
            i += 2
            continue
        out.append(ch)
        i += 1
    raise FilterSyntaxError(text, start, f"unterminated {what} (no closing {quote} before end of input)")


def _tokenize(text: str) -> Iterator[_Token]:
    """Tokens on demand, so that a lexical error after a syntax error is not reported first."""
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
            continue
        start = i
        if ch.isascii() and (ch.isalpha() or ch == "_"):
            m = _IDENT_RE.match(text, i)
            assert m is not None
            word = m.group()
            low = word.lower()
            i = m.end()
            if low in ("true", "false"):
                yield _Token("literal", low == "true", start, word)
            elif low in _KEYWORDS:
                yield _Token(low, low, start, word)
            else:
                yield _Token("ident", word, start, word)
        elif ch == "`":
            name, i = _scan_quoted(text, start, "`", "`\\", "back-quoted column name")
            if not name:
                raise FilterSyntaxError(text, start, "empty back-quoted column name")
            yield _Token("ident", name, start, text[start:i])
        elif ch in "'\"":
            value, i = _scan_quoted(text, start, ch, "'\"\\", "string literal")
            yield _Token("literal", value, start, text[start:i])
        elif ch in "0123456789" or (ch in "-." and _NUMBER_RE.match(text, i) is not None):
            m = _NUMBER_RE.match(text, i)
            if m is None or (m.end() < n and (text[m.end()].isalnum() or text[m.end()] in "_.")):
                j = i + 1
                while j < n and (text[j].isalnum() or text[j] in "_.+-"):
                    j += 1
                raise FilterSyntaxError(text, start, f"malformed number {text[start:j]!r}")
            yield _Token("literal", _number(text, start, m.group()), start, m.group())
            i = m.end()
        elif text.startswith(("==", "!=", "<=", ">="), i):
            yield _Token("op", text[i : i + 2], start, text[i : i + 2])
            i += 2
        elif ch in "<>=":
            yield _Token("op", ch, start, ch)
            i += 1
        elif ch in _PUNCT:
            yield _Token(_PUNCT[ch], ch, start, ch)
            i += 1
        else:
            hint = _BAD_CHARS.get(ch)
            shown = ch if ch.isprintable() else repr(ch)
            raise FilterSyntaxError(text, start, f"unexpected character '{shown}'" + (f" ({hint})" if hint else ""))
    yield _Token("end", None, n, "")


def _number(text: str, pos: int, literal: str) -> int | float:
    if any(c in literal for c in ".eE"):
        value = float(literal)
        if not np.isfinite(value):
            raise FilterSyntaxError(text, pos, f"number {literal} is out of range")
        return value
    if len(literal) > 25:  # well past 2**64; also keeps int() far from its digit limit
        raise FilterSyntaxError(text, pos, f"integer {literal[:30]}... is out of range")
    value = int(literal)
    if not _INT_MIN <= value <= _INT_MAX:
        raise FilterSyntaxError(text, pos, f"integer {literal} is out of range for a 64-bit column")
    return value


# --------------------------------------------------------------------------- parser


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.stream = _tokenize(text)
        self.ahead: list[_Token] = []
        self.depth = 0

    def peek(self, ahead: int = 0) -> _Token:
        while len(self.ahead) <= ahead:
            if self.ahead and self.ahead[-1].kind == "end":
                return self.ahead[-1]
            self.ahead.append(next(self.stream))
        return self.ahead[ahead]

    def take(self) -> _Token:
        tok = self.peek()
        if tok.kind != "end":
            self.ahead.pop(0)
        return tok

    def fail(self, tok: _Token, expected: str, hint: str = "") -> FilterSyntaxError:
        return FilterSyntaxError(self.text, tok.pos, f"expected {expected} but found {tok.describe()}{hint}")

    def parse(self) -> Expr:
        if self.peek().kind == "end":
            raise FilterSyntaxError(self.text, 0, "the filter is empty (pass None instead for no filter)")
        expr = self.parse_or()
        tok = self.peek()
        if tok.kind == ")":
            raise FilterSyntaxError(self.text, tok.pos, "unmatched ')'")
        if tok.kind != "end":
            raise self.fail(tok, "'and', 'or' or end of input")
        return expr

    def parse_or(self) -> Expr:
        items = [self.parse_and()]
        while self.peek().kind == "or":
            self.take()
            items.append(self.parse_and())
        return items[0] if len(items) == 1 else Or(tuple(items))

    def parse_and(self) -> Expr:
        items = [self.parse_unary()]
        while self.peek().kind == "and":
            self.take()
            items.append(self.parse_unary())
        return items[0] if len(items) == 1 else And(tuple(items))

    def parse_unary(self) -> Expr:
        tok = self.peek()
        if tok.kind in ("not", "("):
            self.depth += 1
            if self.depth > _MAX_DEPTH:
                raise FilterSyntaxError(self.text, tok.pos, f"expression nested more than {_MAX_DEPTH} levels deep")
            self.take()
            if tok.kind == "not":
                expr: Expr = Not(self.parse_unary())
            else:
                expr = self.parse_or()
                close = self.take()
                if close.kind != ")":
                    raise self.fail(close, f"')' to close the '(' at position {tok.pos}")
            self.depth -= 1
            return expr
        return self.parse_predicate()

    def parse_predicate(self) -> Expr:
        tok = self.take()
        if tok.kind == "literal":
            raise self._literal_on_left(tok)
        if tok.kind != "ident":
            raise self.fail(tok, "a column name, 'not' or '('")
        column = tok.value
        op = self.take()
        if op.kind == "op":
            if op.value == "=":
                raise FilterSyntaxError(self.text, op.pos, "expected a comparison operator but found '='; use '=='")
            return Compare(column, op.value, self.parse_literal())
        if op.kind == "in":
            return IsIn(column, self.parse_list(), False)
        if op.kind == "not":
            nxt = self.take()
            if nxt.kind != "in":
                raise self.fail(nxt, "'in' after 'not'")
            return IsIn(column, self.parse_list(), True)
        raise self.fail(op, "a comparison operator (==, !=, <, <=, >, >=, in, not in)")

    def _literal_on_left(self, tok: _Token) -> FilterSyntaxError:
        op, other = self.peek(), self.peek(1)
        hint = ""
        if op.kind == "op" and op.value in _MIRRORED_OP and other.kind == "ident":
            hint = f"; write: {_render_column(other.value)} {_MIRRORED_OP[op.value]} {tok.text}"
        return self.fail(tok, "a column name", f" (the column must be on the left of a comparison{hint})")

    def parse_literal(self) -> Value:
        tok = self.take()
        if tok.kind == "literal":
            return tok.value
        expected = "a literal value (quoted string, number, True or False)"
        if tok.kind == "ident":
            raise self.fail(tok, expected, f" (quote strings: '{tok.value}'; comparing two columns is not supported)")
        raise self.fail(tok, expected)

    def parse_list(self) -> tuple[Value, ...]:
        tok = self.take()
        if tok.kind != "[":
            raise self.fail(tok, "'[' starting a list of values")
        values: list[Value] = []
        if self.peek().kind == "]":
            self.take()
            return ()
        while True:
            values.append(self.parse_literal())
            sep = self.take()
            if sep.kind == "]":
                return tuple(values)
            if sep.kind != ",":
                raise self.fail(sep, "',' or ']'")
            if self.peek().kind == "]":  # trailing comma
                self.take()
                return tuple(values)


def parse_filter(text: str) -> Expr:
    """Parse filter text into an ``Expr``; errors point at the offending character.

    Parse once and evaluate many times: every block of every experiment reuses the same tree.
    """
    if not isinstance(text, str):
        raise InputTypeError(f"a filter must be a string, not {type(text).__name__}")
    return _Parser(text).parse()


# --------------------------------------------------------------------------- evaluation


def _push_not(expr: Expr, negate: bool = False) -> Expr:
    """Negation normal form: ``not`` pushed onto the predicates.

    Predicates are false on missing values in both polarities, so evaluating the NNF with
    ordinary boolean logic gives exactly SQL's three-valued answer (And/Or are monotone).
    """
    if isinstance(expr, Compare):
        return Compare(expr.column, _NEGATED_OP[expr.op], expr.value) if negate else expr
    if isinstance(expr, IsIn):
        return IsIn(expr.column, expr.values, not expr.negate) if negate else expr
    if isinstance(expr, Not):
        return _push_not(expr.item, not negate)
    if isinstance(expr, (And, Or)):
        items = tuple(_push_not(i, negate) for i in expr.items)
        return (Or if isinstance(expr, And) == negate else And)(items)
    raise TypeError(f"not a filter expression: {expr!r}")


def _leaves(expr: Expr) -> Iterator[Compare | IsIn]:
    if isinstance(expr, (Compare, IsIn)):
        yield expr
    elif isinstance(expr, Not):
        yield from _leaves(expr.item)
    else:
        for item in expr.items:  # type: ignore[attr-defined]
            yield from _leaves(item)


def _kind(values: pd.Series | pd.Index) -> tuple[str, str]:
    """(kind, description) of values: which literals they may meet, and how to say it."""
    return value_kind(values)


def _as_bool(result: Any) -> np.ndarray:
    """A comparison result as a numpy bool array; a missing (NA) result counts as no match."""
    if isinstance(result, (pd.Series, pd.Index)):
        result = result.array if isinstance(result.dtype, ExtensionDtype) else result.to_numpy()
    if isinstance(result, ExtensionArray):
        return result.to_numpy(dtype=bool, na_value=False)
    return np.asarray(result, dtype=bool)


class _Column:
    """One frame column prepared once per evaluation, however many predicates read it."""

    def __init__(self, name: str, series: pd.Series):
        self.name = name
        self.n = len(series)
        self.codes: np.ndarray | None = None
        if isinstance(series.dtype, pd.CategoricalDtype):
            self.codes = np.asarray(series.array.codes)
            self.values: pd.Series | pd.Index = series.cat.categories
            # no categories at all (every value missing) says nothing about the intended type
            self.kind, self.desc = _kind(series)
        else:
            self.values = series
            self.kind, self.desc = _kind(series)
        self._missing: np.ndarray | bool | None = False  # False = not computed yet

    @property
    def missing(self) -> np.ndarray | None:
        """Rows with a missing value, or None when there are none."""
        if self._missing is False:
            if self.codes is not None:
                m = self.codes < 0
            elif isinstance(self.values.dtype, np.dtype) and self.values.dtype.kind in "biu":
                m = None
            else:
                m = np.asarray(self.values.isna(), dtype=bool)
            self._missing = m if m is not None and m.any() else None
        return self._missing  # type: ignore[return-value]

    def check(self, op: str, value: Value) -> None:
        """Refuse literals that could only match by coercion, before any row is looked at."""
        kind, name = self.kind, self.name
        lit = _render_value(value)
        if kind == "empty":
            return
        if kind == "unsupported":
            raise FilterTypeError(name, f"column {name!r} has dtype {self.desc}, which filters cannot compare")
        if kind == "number":
            if isinstance(value, str):
                raise FilterTypeError(
                    name, f"column {name!r} is numeric ({self.desc}) but {lit} is a string; write numbers unquoted"
                )
            if isinstance(value, bool):
                raise FilterTypeError(name, f"column {name!r} is numeric ({self.desc}) but {lit} is a boolean")
        elif kind == "string":
            if not isinstance(value, str):
                what = "a boolean" if isinstance(value, bool) else "a number"
                raise FilterTypeError(
                    name,
                    f"column {name!r} holds strings ({self.desc}) but {lit} is {what}; "
                    f"quote it: {_render_column(name)} {op} '{value}'",
                )
        elif kind == "bool":
            if not isinstance(value, bool):
                raise FilterTypeError(
                    name, f"column {name!r} holds booleans ({self.desc}); compare it with True or False, not {lit}"
                )
            if op in _ORDERING_OPS:
                raise FilterTypeError(name, f"column {name!r} holds booleans; only ==, !=, in and not in apply")
        elif kind == "mixed" and op in _ORDERING_OPS:
            raise FilterTypeError(
                name, f"column {name!r} holds values of mixed types ({self.desc}); only ==, !=, in and not in apply"
            )

    def check_leaf(self, leaf: Compare | IsIn) -> None:
        if isinstance(leaf, Compare):
            self.check(leaf.op, leaf.value)
        else:
            for v in leaf.values:
                self.check("==", v)

    def _apply(self, values: pd.Series | pd.Index, leaf: Compare | IsIn) -> np.ndarray:
        try:
            if isinstance(leaf, Compare):
                out = _as_bool(_OP_FUNCS[leaf.op](values, leaf.value))
            else:
                out = _as_bool(values.isin(list(leaf.values)))
                if leaf.negate:
                    out = ~out
        except (TypeError, ValueError) as e:
            raise FilterTypeError(
                self.name, f"cannot evaluate {leaf} on column {self.name!r} ({self.desc}): {e}"
            ) from e
        return out

    def match(self, leaf: Compare | IsIn) -> np.ndarray:
        """Rows where the predicate holds; always False where the value is missing."""
        if self.kind == "empty" or self.n == 0:
            return np.zeros(self.n, dtype=bool)
        if self.codes is not None:
            on_categories = self._apply(self.values, leaf)
            if not on_categories.any():
                return np.zeros(self.n, dtype=bool)
            return np.append(on_categories, False)[self.codes]  # code -1 picks the appended False
        out = self._apply(self.values, leaf)
        missing = self.missing
        if missing is not None:
            out = out & ~missing
        return out


class _Frame:
    def __init__(self, frame: pd.DataFrame):
        self.frame = frame
        self.n = len(frame)
        self._columns: dict[str, _Column] = {}
        self.unfit: set[int] = set()  # leaves (by id) whose literal does not fit their column here
        self.substitute: dict[int, IsIn] = {}  # `in` leaves (by id) with only the values that fit

    def column(self, name: str) -> _Column:
        col = self._columns.get(name)
        if col is None:
            series = self.frame[name]
            if isinstance(series, pd.DataFrame):
                raise FilterTypeError(name, f"column {name!r} appears more than once in the frame")
            col = self._columns[name] = _Column(name, series)
        return col


def check_columns(expr: Expr, columns: Iterable[Any]) -> None:
    """Raise UnknownColumnError (with near misses) if ``expr`` reads a column not in ``columns``.

    Lets callers validate a filter once against a schema before touching any data.
    """
    have = set(columns)
    missing = sorted(c for c in expr.columns() if c not in have)
    if missing:
        raise UnknownColumnError(missing, have)


def _coerce(expr: Expr | str) -> Expr:
    if isinstance(expr, str):
        return parse_filter(expr)
    if not isinstance(expr, Expr):
        raise InputTypeError(f"expected a filter expression, not {type(expr).__name__}")
    return expr


def evaluate(expr: Expr | str, frame: pd.DataFrame, *, lenient: bool = False) -> np.ndarray:
    """Boolean mask (numpy, positional, one per row of ``frame``) of the rows that match.

    All literals are type-checked against their columns first, so a bad filter fails the same
    way whatever rows a block holds; then sub-expressions short-circuit once decided.

    ``lenient``: a comparison whose literal does not fit the column's type matches no row (as a
    missing value does) instead of raising. Queries use it inside each experiment, after the
    planner checked that the literal fits the column in at least one experiment: a column may be
    numeric in one experiment and text in another (``check_literals_fit``).
    """
    expr = _coerce(expr)
    check_columns(expr, frame.columns)
    data = _Frame(frame)
    nnf = _push_not(expr)
    for leaf in _leaves(nnf):
        try:
            data.column(leaf.column).check_leaf(leaf)
        except FilterTypeError:
            if not lenient:
                raise
            column = data.column(leaf.column)
            fitting = [v for v in leaf.values if _fits(column, v)] if isinstance(leaf, IsIn) else []
            if fitting:  # `in [1, 'd1']`: the values this column's type can hold
                data.substitute[id(leaf)] = IsIn(leaf.column, tuple(fitting), leaf.negate)
            else:
                data.unfit.add(id(leaf))
    return _eval(nnf, data)


def _fits(column: _Column, value: Value) -> bool:
    try:
        column.check("==", value)
    except FilterTypeError:
        return False
    return True


def check_literals_fit(expr: Expr, kinds_by_experiment: Iterable[dict[str, str]]) -> None:
    """Raise :class:`FilterTypeError` for a comparison whose literal fits its column in no experiment.

    ``kinds_by_experiment``: per experiment, column -> kind (``schema.value_kind``). A column an
    experiment lacks, or holds only missing values in, says nothing.
    """
    kinds: dict[str, set[str]] = {}
    for mapping in kinds_by_experiment:
        for column, kind in mapping.items():
            kinds.setdefault(column, set()).add(kind)
    for leaf in _leaves(_push_not(expr)):
        seen = kinds.get(leaf.column, set()) - {"empty"}
        if not seen:
            continue
        literals = [(leaf.op, leaf.value)] if isinstance(leaf, Compare) else [("==", v) for v in leaf.values]
        for op, value in literals:
            errors = []
            for kind in sorted(seen):
                column = _Column.__new__(_Column)
                column.name, column.kind, column.desc = leaf.column, kind, f"{kind} in some experiments"
                try:
                    column.check(op, value)
                    break
                except FilterTypeError as exc:
                    errors.append(exc)
            else:
                raise errors[0]


def _eval(expr: Expr, data: _Frame) -> np.ndarray:
    if isinstance(expr, (Compare, IsIn)):
        if id(expr) in data.unfit:
            return np.zeros(data.n, dtype=bool)
        return data.column(expr.column).match(data.substitute.get(id(expr), expr))
    is_and = isinstance(expr, And)
    out: np.ndarray | None = None
    for item in expr.items:  # type: ignore[attr-defined]
        part = _eval(item, data)
        if out is None:
            out = part if part.flags.writeable else part.copy()  # pandas 3 hands out read-only views
        elif is_and:
            np.logical_and(out, part, out=out)
        else:
            np.logical_or(out, part, out=out)
        if (is_and and not out.any()) or (not is_and and out.all()):
            break
    assert out is not None
    return out


# internal three-valued codes ordered False < Unknown < True, so And = min and Or = max
_F, _U, _T = 0, 1, 2
_PARTIAL_OUT = np.array([PARTIAL_FALSE, PARTIAL_UNKNOWN, PARTIAL_TRUE], dtype=np.int8)


def evaluate_partial(expr: Expr | str, frame: pd.DataFrame, available: Iterable[str]) -> np.ndarray:
    """Per row of a catalog: int8 PARTIAL_TRUE (1), PARTIAL_FALSE (0) or PARTIAL_UNKNOWN (-1).

    Each row describes a run of cells and each ``available`` column holds the value every cell
    of the run has. Predicates on other columns are unknown, as are predicates on a missing
    catalog value (the catalog may write missing for "varies"), and Kleene logic combines them.
    The answer is sound for pruning: 0 only if no cell of the run can match, 1 only if all do.
    """
    expr = _coerce(expr)
    available = set(available)
    check_columns(
        expr, [c for c in frame.columns if c in available] + [c for c in expr.columns() if c not in available]
    )
    data = _Frame(frame)
    nnf = _push_not(expr)
    for leaf in _leaves(nnf):
        if leaf.column in available:
            data.column(leaf.column).check_leaf(leaf)
    return _PARTIAL_OUT[_eval_partial(nnf, data, available)]


def _eval_partial(expr: Expr, data: _Frame, available: set[str]) -> np.ndarray:
    if isinstance(expr, (Compare, IsIn)):
        if expr.column not in available:
            return np.full(data.n, _U, dtype=np.int8)
        col = data.column(expr.column)
        out = np.where(col.match(expr), _T, _F).astype(np.int8)
        if col.missing is not None:
            out[col.missing] = _U
        return out
    reduce = np.minimum if isinstance(expr, And) else np.maximum
    parts = [_eval_partial(item, data, available) for item in expr.items]  # type: ignore[attr-defined]
    return reduce.reduce(parts, axis=0) if len(parts) > 1 else parts[0]
