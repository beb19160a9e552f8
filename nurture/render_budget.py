"""The budget each email renders on: templates cannot hang a dispatch or fill the machine.

Marketers write templates, by mistake or on purpose, that loop a billion times or build
a string of a gigabyte. Every render runs inside :func:`spending`, which gives it a
:class:`RenderLimits` budget: loop items and calls are counted (a filter wraps each
``{% for %}``'s iterable, a contextvar holds the budget), whatever builds a string or a
list (``*``, ``~``, widths, filters, methods) is checked before it allocates, and the
wall clock is a backstop. Past a limit the render raises :class:`Refused`, which the
renderer reports with the template's file and line. What is and is not covered:
docs/templates.md.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from itertools import chain
from string import Formatter
from types import BuiltinMethodType
from typing import Any

from jinja2 import (
    Environment,
    Template,
    nodes,
    pass_context,
)
from jinja2.environment import TemplateModule
from jinja2.nodes import EvalContext
from jinja2.runtime import Context, LoopContext, Macro, markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace, _PassArg, generate_lorem_ipsum
from jinja2.visitor import NodeTransformer
from markupsafe import Markup

# Python itself refuses to print an int longer than this; the template may not make one.
MAX_INT_DIGITS = 4_300
_MAX_INT_BITS = MAX_INT_DIGITS * 10 // 3
# Deeper than this, Python's own printing of a nested list fails anyway.
_MAX_NESTING = 500
_END = object()


@dataclass(frozen=True, slots=True)
class RenderLimits:
    """What rendering one email (subject, HTML and text parts) may cost.

    Past any of these the render stops with a TemplateError. The defaults are far above what
    an email needs (the shipped templates take a few dozen steps and a few kB) and far
    below what would hurt the machine.
    """

    steps: int = 100_000  # loop iterations, calls, template loads, list items a filter goes through
    repeat: int = 100_000  # characters or items one `*`, width, padding or count may ask for
    text: int = 1_000_000  # characters (or items) of any one value, and of each part of the email
    produced: int = 10_000_000  # characters built in all while rendering one email
    seconds: float = 5.0  # wall-clock backstop, checked at every step
    template_bytes: int = 1_000_000  # one template file


class Refused(Exception):
    """A template asked for more than its budget, or for a file it may not read; the message says which."""


class _Budget:
    """What one email's render has spent so far; held in ``_BUDGET`` while it renders."""

    __slots__ = ("clock", "deadline", "limits", "produced", "steps")

    def __init__(self, limits: RenderLimits, clock: Callable[[], float]) -> None:
        self.limits = limits
        self.clock = clock
        self.deadline = clock() + limits.seconds
        self.steps = 0
        self.produced = 0

    def step(self, count: int = 1) -> None:
        """Count loop iterations, calls or items; stop past the step budget or the deadline."""
        self.steps += count
        if self.steps > self.limits.steps:
            raise Refused(f"runs more than {self.limits.steps:,} steps (each loop iteration, call and include is one)")
        if self.clock() >= self.deadline:
            raise Refused(f"takes longer than {self.limits.seconds:g} s to render")

    def allow(self, size: int, op: str, *, cap: int | None = None, unit: str = "characters") -> None:
        """Before ``op`` builds something of ``size`` characters (or items): refuse it past ``cap``."""
        cap = self.limits.text if cap is None else cap
        if size > cap:
            raise Refused(f"{op} would produce {size:,} {unit} (at most {cap:,})")

    def charge(self, value: Any, op: str) -> Any:
        """After ``op`` built ``value``: count a string's characters (a list's items) against the budget."""
        if isinstance(value, str | list | tuple | dict):
            self.allow(len(value), op, unit="characters" if isinstance(value, str) else "items")
            self.produced += len(value)
            if self.produced > self.limits.produced:
                raise Refused(f"builds more than {self.limits.produced:,} characters in all")
        return value

    def weigh(self, value: Any, op: str, *, indent: int = 0) -> int:
        """About how many characters printing ``value`` takes (``str``, ``|tojson`` with ``indent``).

        Refuses more than ``limits.text``. Nested lists, dicts and namespaces are walked, each
        item a step, and the walk stops as soon as the sum passes the limit: a list holding
        the same long list many times is refused before anything prints it.
        """
        if isinstance(value, str | bytes):
            return len(value)
        if value is None or isinstance(value, int | float):
            return 8
        cap = self.limits.text
        total = visited = 0
        stack: list[Iterator[Any]] = [iter((value,))]
        while stack:
            item = next(stack[-1], _END)
            if item is _END:
                stack.pop()
                continue
            visited += 1
            children: Collection[Any] | None = None
            if isinstance(item, str | bytes):
                total += len(item) + 2
            elif isinstance(item, int):
                total += item.bit_length() // 3 + 1
            elif isinstance(item, Namespace):
                children = item._Namespace__attrs
            elif isinstance(item, TemplateModule):
                total += sum(map(len, item._body_stream))
            elif isinstance(item, Collection) and not isinstance(item, range):
                children = item
            else:
                total += 24
            if children is not None:
                total += 2 + len(children) * (4 + len(stack) * indent)
                if len(stack) > _MAX_NESTING:
                    raise Refused(f"{op}: the value is nested more than {_MAX_NESTING} levels deep")
                if total <= cap:
                    items = chain.from_iterable(children.items()) if isinstance(children, Mapping) else children
                    stack.append(iter(items))
            if total > cap:
                raise Refused(f"{op}: the value would print as more than {cap:,} characters")
        self.step(visited - 1)
        return total


_BUDGET: ContextVar[_Budget | None] = ContextVar("nurture_render_budget", default=None)


def _budget() -> _Budget:
    budget = _BUDGET.get()
    if budget is None:
        raise RuntimeError("nurture templates render only through EmailRenderer, which sets their budget")
    return budget


def _int(value: Any) -> int:
    # A width that is not an int makes the operation itself fail; it is not a size to check.
    return value if isinstance(value, int) else 0


def _loop_items(iterable: Iterable[Any]) -> Iterator[Any]:
    """The items of a ``{% for %}`` (or of a recursive ``loop()``), each counted as a step."""
    budget = _budget()
    for item in iterable:
        budget.step()
        yield item


def _concat(eval_ctx: EvalContext, *pieces: Any) -> str:
    """The ``~`` operator, refusing a result longer than ``limits.text``."""
    budget = _budget()
    size = sum(len(piece) if isinstance(piece, str) else budget.weigh(piece, "the ~ operator") for piece in pieces)
    budget.allow(size, "the ~ operator")
    joined = markup_join(pieces) if eval_ctx.autoescape else str_join(pieces)
    return budget.charge(joined, "the ~ operator")  # type: ignore[no-any-return]


def _built(value: Any) -> Any:
    """A list, tuple or dict a literal built from other values: refused if printing (or
    comparing, or hashing) it would go through more than ``limits.text`` characters."""
    _budget().weigh(value, f"the {type(value).__name__}")
    return value


def _joined(pieces: Iterable[str]) -> str:
    """``environment.concat``: joins what a macro, a call block or ``{% set %}…{% endset %}`` captured."""
    budget = _budget()
    if isinstance(pieces, list):
        budget.allow(sum(map(len, pieces)), "a captured block or macro")
    else:
        listed, size = [], 0
        for piece in pieces:
            size += len(piece)
            budget.allow(size, "a captured block or macro")
            listed.append(piece)
        pieces = listed
    return budget.charge("".join(pieces), "a captured block or macro")  # type: ignore[no-any-return]


def finalize(value: Any) -> Any:
    """What ``{{ … }}`` prints: an empty profile field as nothing, not as the word "None"; a
    list, dict or namespace only if printing it stays within the budget."""
    if value is None:
        return ""
    if type(value) not in _PRINTS_AS_IT_IS:
        _budget().weigh(value, "{{ … }}")
    return value


# What `{{ … }}` prints most: checked by type first, as this runs for every expression printed.
_PRINTS_AS_IT_IS = frozenset({str, Markup, int, float, bool})


# ---------------------------------------------------------------------------------------------
# Sizes checked before an operation builds its result.

_PRINTF_KEY_PARENS = re.compile(r"[()]")
_PRINTF_SPEC = re.compile(r"[#0 +-]*(\*|\d*)(?:\.(\*|\d*))?")


def _printf_widths(fmt: str) -> Iterator[str]:
    """The widths and precisions of a ``%`` format, read left to right as Python does (linear time)."""
    pos = 0
    while (pos := fmt.find("%", pos)) != -1:
        pos += 1
        if fmt.startswith("(", pos):  # a mapping key: skip to its closing parenthesis
            depth, pos = 1, pos + 1
            while depth:
                paren = _PRINTF_KEY_PARENS.search(fmt, pos)
                if paren is None:
                    return  # Python refuses the format itself
                depth += 1 if paren.group() == "(" else -1
                pos = paren.end()
        spec = _PRINTF_SPEC.match(fmt, pos)
        if spec is not None:
            yield from (number for number in spec.groups() if number)
            pos = spec.end() + 1


def _check_widths(budget: _Budget, numbers: Iterable[str], op: str) -> None:
    for number in numbers:
        if number == "*" or "{" in number:
            raise Refused(f"{op}: a width or precision taken from the arguments is not allowed")
        budget.allow(int(number) if len(number) <= 18 else 10**18, op, cap=budget.limits.repeat)


def _format_widths(fmt: str) -> Iterator[str]:
    """The numbers in the format specs of a ``str.format`` string (nested fields yield ``{``)."""
    for _, _, spec, _ in Formatter().parse(fmt):
        if spec:
            yield from ("{",) if "{" in spec else re.findall(r"\d+", spec)


def _replaced_size(text: Any, old: Any, new: Any, count: Any) -> int:
    if not all(isinstance(part, str | bytes) for part in (text, old, new)):
        return 0
    hits = len(text) + 1 if not old else text.count(old)
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return int(len(text) + hits * (len(new) - len(old)))


def _check_text_method(budget: _Budget, text: Any, name: str, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Refuse a string method whose result would be too long; returns the arguments to call it with."""
    op = f".{name}()"
    if name in {"center", "ljust", "rjust", "zfill"} and args:
        budget.allow(_int(args[0]), op, cap=budget.limits.repeat)
    elif name == "expandtabs":
        tab = b"\t" if isinstance(text, bytes | bytearray) else "\t"
        budget.allow(len(text) + text.count(tab) * _int(args[0] if args else 8), op)
    elif name == "replace" and len(args) >= 2:
        budget.allow(_replaced_size(text, args[0], args[1], args[2] if len(args) > 2 else -1), op)
    elif name == "join" and args:
        items = list(_loop_items(args[0]))
        budget.allow(sum(len(i) for i in items if isinstance(i, str | bytes)) + len(text) * len(items), op)
        return (items, *args[1:])
    elif name == "translate" and args and isinstance(args[0], Mapping):
        longest = max((len(v) for v in args[0].values() if isinstance(v, str)), default=1)
        budget.allow(len(text) * longest, op)
    elif name in {"format", "format_map"} and isinstance(text, str):
        _check_widths(budget, _format_widths(text), op)
    return args


_CONTAINERS = (list, tuple, dict, set, frozenset)
# What Jinja adds to calls made inside a loop or block, for Context.call to take back out.
_JINJA_CALL_KWARGS = frozenset({"_loop_vars", "_block_vars"})


def _check_call(budget: _Budget, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Refuse a call that would build too much, before it runs; returns the arguments to call it with."""
    kwargs = {key: value for key, value in kwargs.items() if key not in _JINJA_CALL_KWARGS}
    if func is generate_lorem_ipsum:
        given = inspect.signature(generate_lorem_ipsum).bind(*args, **kwargs)
        given.apply_defaults()
        words = _int(given.arguments["n"]) * max(_int(given.arguments["min"]), _int(given.arguments["max"]))
        budget.allow(words, "lipsum()", cap=budget.limits.repeat, unit="words")
        return args
    method = getattr(func, "__wrapped__", func)  # str.format comes wrapped by the sandbox
    if type(method) is not BuiltinMethodType:
        return args
    for value in chain(args, kwargs.values()):
        budget.weigh(value, f".{method.__name__}()")
    owner = method.__self__
    if isinstance(owner, str | bytes | bytearray):
        return _check_text_method(budget, owner, method.__name__, args)
    if isinstance(owner, int) and method.__name__ == "to_bytes":
        length = args[0] if args else kwargs.get("length", 1)
        budget.allow(_int(length), ".to_bytes()", cap=budget.limits.repeat, unit="bytes")
    return args


def _check_times(budget: _Budget, left: Any, right: Any) -> None:
    if isinstance(left, int) and isinstance(right, int):
        if left.bit_length() + right.bit_length() > _MAX_INT_BITS:
            raise Refused(f"the * operator would produce a number of more than {MAX_INT_DIGITS:,} digits")
        return
    sequence, count = (left, right) if isinstance(right, int) else (right, left)
    if isinstance(sequence, str | bytes | list | tuple) and isinstance(count, int):
        unit = "characters" if isinstance(sequence, str | bytes) else "items"
        budget.allow(len(sequence) * count, "the * operator", cap=budget.limits.repeat, unit=unit)
        if isinstance(sequence, list | tuple):  # [a_long_list] * 1000 is 1,000 times a long list
            budget.allow(budget.weigh(sequence, "the * operator") * count, "the * operator")


def _check_power(left: Any, right: Any) -> None:
    # The result has about right * log2(left) bits: estimate it, never compute the number.
    if (
        isinstance(left, int)
        and isinstance(right, int)
        and abs(left) > 1
        and (right > _MAX_INT_BITS or right * math.log2(abs(left)) > _MAX_INT_BITS)
    ):
        raise Refused(f"the ** operator would produce a number of more than {MAX_INT_DIGITS:,} digits")


# Filters: what each one may ask for. A filter not named in _FLAT may print, compare or hash
# the nested content of its value and arguments, so those are weighed first.
_CONSTANT_TIME = frozenset(
    {"abs", "attr", "count", "d", "default", "filesizeformat", "first", "float", "int", "items", "last"}
    | {"length", "random", "reverse", "round"}
)
_FLAT = _CONSTANT_TIME | {"batch", "list", "map", "reject", "rejectattr", "select", "selectattr", "slice"}


def _filter_sizes(
    budget: _Budget, name: str, value: Any, weight: int, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """Refuse a filter call whose width or count arguments ask for too much (``weight``: the value's, printed)."""
    repeat = budget.limits.repeat
    op = f"|{name}"

    def arg(position: int, keyword: str, default: Any = None) -> Any:
        return args[position] if len(args) > position else kwargs.get(keyword, default)

    if name == "center":
        budget.allow(_int(arg(0, "width", 80)), op, cap=repeat)
    elif name == "indent":
        width = arg(0, "width", 4)
        pad = width if isinstance(width, int) else len(str(width))
        budget.allow(pad, op, cap=repeat)
        budget.allow(len(str(value)) + (str(value).count("\n") + 1) * pad, op)
    elif name == "replace":
        budget.allow(_replaced_size(str(value), str(arg(0, "old")), str(arg(1, "new")), arg(2, "count")), op)
    elif name == "format":
        _check_widths(budget, _printf_widths(str(value)), op)
    elif name == "join":
        budget.allow(weight + len(value) * len(str(arg(0, "d", ""))), op)
    elif name in {"batch", "slice"}:
        count = _int(arg(0, "linecount" if name == "batch" else "slices"))
        budget.allow(count, op, cap=repeat, unit="items")
        if arg(1, "fill_with") is not None:  # each batch filled with the same value
            budget.allow(count * budget.weigh(arg(1, "fill_with"), op), op)
    elif name == "tojson":
        indent = arg(0, "indent")
        pad = indent if isinstance(indent, int) else len(str(indent or ""))
        budget.allow(pad, op, cap=repeat)
        budget.weigh(value, op, indent=pad)
    elif name == "pprint":
        budget.weigh(value, op, indent=1)
    elif name == "wordwrap":
        text = str(value)
        budget.allow(len(text) + (len(text) + 1) * len(str(arg(3, "wrapstring") or "\n")), op)
    elif name == "urlize":
        text = str(value)
        extra = len(str(arg(3, "target") or "")) + len(str(arg(4, "rel") or "")) + 60
        budget.allow(6 * len(text) + len(text.split()) * extra, op)
    elif name == "sum" and not isinstance(arg(1, "start", 0), int | float):
        raise Refused(f"{op}: start must be a number (sum adds numbers; join strings with |join)")
    elif name == "round" and abs(_int(arg(0, "precision", 0))) > MAX_INT_DIGITS:
        raise Refused(f"{op}: precision must be between -{MAX_INT_DIGITS:,} and {MAX_INT_DIGITS:,}")


def _guarded_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """``func`` behind the budget: counts the items it goes through, checks sizes, charges its result.

    Guarded filters take the context, which also keeps Jinja from running them at compile
    time, outside any budget.
    """
    pass_arg = _PassArg.from_obj(func)
    walks = name not in _FLAT
    counts = name not in _CONSTANT_TIME

    @pass_context
    def guarded(context: Context, value: Any, *args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        if name == "join" and not isinstance(value, Collection):
            value = list(_loop_items(value))
        elif counts and isinstance(value, list | tuple | dict | set | frozenset | range):
            budget.step(len(value))
        weight = 0
        if walks:
            weight = budget.weigh(value, f"|{name}")
            for item in chain(args, kwargs.values()):
                budget.weigh(item, f"|{name}")
        _filter_sizes(budget, name, value, weight, args, kwargs)
        if pass_arg is _PassArg.context:
            result = func(context, value, *args, **kwargs)
        elif pass_arg is _PassArg.eval_context:
            result = func(context.eval_ctx, value, *args, **kwargs)
        elif pass_arg is _PassArg.environment:
            result = func(context.environment, value, *args, **kwargs)
        else:
            result = func(value, *args, **kwargs)
        if isinstance(result, _CONTAINERS):  # |map(attribute='x', default=a_long_list)|list, …
            budget.weigh(result, f"|{name}")
        return budget.charge(result, f"|{name}")

    return guarded


class _Metered(NodeTransformer):
    """Rewrites a parsed template so the budget sees every loop item, every ``~`` and every
    list, tuple or dict a literal builds from other values."""

    def __init__(self, environment: Environment) -> None:
        self.environment = environment

    def _helper(self, name: str, args: list[nodes.Expr], lineno: int) -> nodes.Call:
        call = nodes.Call(nodes.EnvironmentAttribute(name, lineno=lineno), args, [], None, None, lineno=lineno)
        call.set_environment(self.environment)
        return call

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = self._helper("nurture_loop_items", [node.iter], node.lineno)  # type: ignore[list-item]
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return self._helper("nurture_concat", node.nodes, node.lineno)

    def visit_List(self, node: nodes.List) -> nodes.Node:
        return self._weighed(node)

    def visit_Dict(self, node: nodes.Dict) -> nodes.Node:
        return self._weighed(node)

    def visit_Tuple(self, node: nodes.Tuple) -> nodes.Node:
        return self._weighed(node) if node.ctx == "load" else self.generic_visit(node)  # not `for a, b in`

    def _weighed(self, node: nodes.Expr) -> nodes.Node:
        # `[b, b, b, b]` nested ten deep is small in memory and 10**10 items to compare or hash.
        self.generic_visit(node)
        try:
            node.as_const()
        except nodes.Impossible:
            return self._helper("nurture_built", [node], node.lineno)
        return node  # a constant, no larger than the template's own text


class BudgetedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, with every loop, call, operator and filter that can cost much on the render's budget."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    concat = staticmethod(_joined)
    # Reached only from the code _Metered adds: a template cannot name `environment`.
    nurture_loop_items = staticmethod(_loop_items)
    nurture_concat = staticmethod(_concat)
    nurture_built = staticmethod(_built)

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.filters = {name: _guarded_filter(name, func) for name, func in self.filters.items()}

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        return _Metered(self).visit(super()._parse(source, name, filename))  # type: ignore[no-any-return]

    def _load_template(self, name: str, globals: Any) -> Template:
        budget = _BUDGET.get()
        if budget is not None:  # an include, import or extends while rendering: one step (the clock waits)
            budget.steps += 1
            if budget.steps > budget.limits.steps:
                budget.step(0)
        return super()._load_template(name, globals)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        budget = _budget()
        op = f"the {operator} operator"
        if operator == "*":
            _check_times(budget, left, right)
        elif operator == "**":
            _check_power(left, right)
        elif operator == "+" and isinstance(left, str) and isinstance(right, str):
            budget.allow(len(left) + len(right), op)
        elif operator == "+" and isinstance(left, list | tuple) and isinstance(right, list | tuple):
            budget.allow(budget.weigh(left, op) + budget.weigh(right, op), op)
        elif operator == "%" and isinstance(left, str):
            _check_widths(budget, _printf_widths(left), op)
            budget.weigh(right, op)
        return budget.charge(self.binop_table[operator](left, right), op)

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        if __obj is _concat:
            return _concat(__context.eval_ctx, *args)
        if __obj is _loop_items:
            return _loop_items(*args)
        if __obj is _built:
            return _built(*args)
        budget = _budget()
        budget.step()
        if isinstance(__obj, LoopContext) and args:  # a recursive loop's next level: count its items too
            args = (_loop_items(args[0]), *args[1:])
        else:
            args = _check_call(budget, __obj, args, kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        if isinstance(result, _CONTAINERS):  # dict.fromkeys(keys, a_long_list), dict(a=x, b=x), …
            budget.weigh(result, "a call")
        return result if isinstance(__obj, Macro) else budget.charge(result, "a call")


@contextmanager
def spending(limits: RenderLimits, clock: Callable[[], float]) -> Iterator[None]:
    """Everything rendered inside draws on one budget of ``limits`` (one email: its subject and parts)."""
    token = _BUDGET.set(_Budget(limits, clock))
    try:
        yield
    finally:
        _BUDGET.reset(token)
