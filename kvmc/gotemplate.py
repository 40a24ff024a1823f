"""docker's ``--format``: the subset of Go's text/template that people's scripts use.

Why written here and not a library: no maintained pure-Python implementation of Go templates
exists on PyPI (the two packages there, ``go-template`` and ``cognihub-pygotemplate``, are 0.0.x
cgo wrappers that need a Go toolchain or a native build), and what docker's format strings use is
small: field chains (``{{.State.Status}}``, ``{{.Config.Labels}}``), ``{{json .}}``, method
calls with arguments (``{{.Label "k"}}``), pipelines (``{{.Names | upper}}``), ``if``/``else``/
``range``/``with`` blocks, literals, ``{{-``/``-}}`` trimming, Go's builtins (``index``, ``len``,
``printf``, ``eq``, ``and``, ...) and docker's own functions (``json``, ``join``, ``split``,
``lower``, ``upper``, ``title``, ``truncate``, ``pad``, ``println``). Not supported: template
definitions (``define``/``template``/``block``), variables other than ``$`` and ``$x :=``
assignments, comments are (``{{/* */}}``).

Values print as Go's ``fmt`` ``%v`` does: ``true``/``false``, ``<no value>`` for a missing map key,
``[a b]`` for a list, ``map[k:v]`` for a map, ``<nil>`` for nil.

:func:`render` runs a template on one value; :func:`table` does docker's ``table`` directive
(a header row, then rows aligned as Go's tabwriter does in docker: min width 10, padding 3).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from kvmc.errors import UsageError


class TemplateError(UsageError):
    """A format string that does not parse or cannot run (docker says "template: ...")."""


class _Missing:
    """A map key that is not there: Go prints ``<no value>``."""

    def __repr__(self) -> str:
        return "<no value>"


MISSING = _Missing()


# ------------------------------------------------------------------------ lexer
_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.DOTALL)
_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<str>"(?:[^"\\]|\\.)*")
  | (?P<raw>`[^`]*`)
  | (?P<num>-?\d+(?:\.\d+)?)
  | (?P<assign>:=)
  | (?P<field>(?:\$[A-Za-z0-9_]*)?(?:\.[A-Za-z0-9_]+)+|\.)
  | (?P<var>\$[A-Za-z0-9_]*)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<pipe>\|)
  | (?P<lparen>\()
  | (?P<rparen>\))
  | (?P<comma>,)
""", re.VERBOSE)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'", "0": "\0"}


@dataclass
class _Tok:
    kind: str
    text: str


def _tokens(text: str) -> list[_Tok]:
    out: list[_Tok] = []
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if not match:
            raise TemplateError(f'template: bad character {text[pos]!r} in "{text.strip()}"')
        pos = match.end()
        kind = match.lastgroup or ""
        if kind == "field" and out and out[-1].kind == "rparen" and text[match.start() - 1] == ")":
            kind = "chain"  # (pipeline).Field
        if kind != "ws":
            out.append(_Tok(kind, match.group()))
    return out


# ----------------------------------------------------------------------- parser
@dataclass
class _Cmd:
    args: list[Any]  # _Tok or _Pipe


@dataclass
class _Pipe:
    cmds: list[_Cmd]
    assign: str | None = None


@dataclass
class _Chain:
    """``(pipeline).A.B``: fields of a parenthesized value."""

    base: Any
    fields: str


@dataclass
class _Node:
    kind: str  # text | action | if | range | with
    text: str = ""
    pipe: _Pipe | None = None
    body: list[_Node] = field(default_factory=list)
    orelse: list[_Node] = field(default_factory=list)


def _parse_pipe(toks: list[_Tok], pos: int = 0, stop: str | None = None) -> tuple[_Pipe, int]:
    assign = None
    if len(toks) > pos + 1 and toks[pos].kind == "var" and toks[pos + 1].kind == "assign":
        assign, pos = toks[pos].text, pos + 2
    cmds, args = [], []
    while pos < len(toks):
        tok = toks[pos]
        if tok.kind == stop:
            break
        if tok.kind == "pipe":
            if not args:
                raise TemplateError("template: missing command before |")
            cmds.append(_Cmd(args))
            args = []
        elif tok.kind == "lparen":
            sub, pos = _parse_pipe(toks, pos + 1, stop="rparen")
            if pos >= len(toks):
                raise TemplateError("template: unclosed (")
            args.append(sub)
        elif tok.kind == "chain":
            if not args or not isinstance(args[-1], _Pipe):
                raise TemplateError(f"template: unexpected {tok.text!r}")
            args[-1] = _Chain(args[-1], tok.text)
        elif tok.kind in ("rparen", "comma", "assign"):
            raise TemplateError(f"template: unexpected {tok.text!r}")
        else:
            args.append(tok)
        pos += 1
    if not args:
        raise TemplateError("template: missing value in an action")
    cmds.append(_Cmd(args))
    return _Pipe(cmds, assign), pos


def _items(text: str) -> list[tuple[str, Any]]:
    """The template as text pieces and actions (their tokens), ``{{-``/``-}}`` trimming done."""
    items: list[tuple[str, Any]] = []
    pos, trim_next = 0, False
    for match in _ACTION.finditer(text):
        chunk = text[pos:match.start()]
        if trim_next:
            chunk = chunk.lstrip()
        if match.group(1):
            chunk = chunk.rstrip()
        if chunk:
            items.append(("text", chunk))
        pos, trim_next = match.end(), bool(match.group(3))
        body = match.group(2).strip()
        if body.startswith("/*"):
            if not body.endswith("*/"):
                raise TemplateError("template: unclosed comment")
            continue
        toks = _tokens(body)
        if not toks:
            raise TemplateError("template: missing value in an action")
        items.append(("action", toks))
    chunk = text[pos:]
    if trim_next:
        chunk = chunk.lstrip()
    if chunk:
        items.append(("text", chunk))
    return items


def _word(item: tuple[str, Any]) -> str:
    kind, toks = item
    return toks[0].text if kind == "action" and toks[0].kind == "ident" else ""


def _parse_list(items: list[tuple[str, Any]], i: int) -> tuple[list[_Node], int]:
    """Nodes up to an ``else`` or ``end`` (left for the caller) or the end of the template."""
    nodes: list[_Node] = []
    while i < len(items):
        kind, value = items[i]
        word = _word(items[i])
        if kind == "text":
            nodes.append(_Node("text", value))
            i += 1
        elif word in ("else", "end"):
            return nodes, i
        elif word in ("if", "range", "with"):
            node = _Node(word, pipe=_parse_pipe(value, 1)[0])
            node.body, i = _parse_list(items, i + 1)
            i = _parse_else_end(node, items, i)
            nodes.append(node)
        elif word in ("define", "template", "block"):
            raise TemplateError(f"template: {{{{{word}}}}} is not supported by kvmc's --format")
        else:
            nodes.append(_Node("action", pipe=_parse_pipe(value)[0]))
            i += 1
    return nodes, i


def _parse_else_end(node: _Node, items: list[tuple[str, Any]], i: int) -> int:
    """After a block's body: its ``else`` part (``else if`` chains nest) and its ``end``."""
    if i >= len(items):
        raise TemplateError(f"template: unexpected EOF: {{{{{node.kind}}}}} has no {{{{end}}}}")
    if _word(items[i]) == "end":
        return i + 1
    toks = items[i][1]
    if len(toks) > 1 and toks[1].text in ("if", "with"):  # else if / else with: one shared end
        inner = _Node(toks[1].text, pipe=_parse_pipe(toks, 2)[0])
        inner.body, i = _parse_list(items, i + 1)
        node.orelse = [inner]
        return _parse_else_end(inner, items, i)
    node.orelse, i = _parse_list(items, i + 1)
    if i >= len(items) or _word(items[i]) != "end":
        raise TemplateError(f"template: {{{{{node.kind}}}}} has more than one {{{{else}}}} or no {{{{end}}}}")
    return i + 1


def _parse(text: str) -> list[_Node]:
    items = _items(text)
    nodes, i = _parse_list(items, 0)
    if i < len(items):
        raise TemplateError(f"template: unexpected {{{{{_word(items[i])}}}}}")
    return nodes


# ---------------------------------------------------------------------- values
def go_string(value: Any) -> str:
    """Go's ``%v`` of a value."""
    if value is MISSING:
        return "<no value>"
    if value is None:
        return "<nil>"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (list, tuple)):
        return "[" + " ".join(go_string(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "map[" + " ".join(f"{k}:{go_string(value[k])}" for k in sorted(value)) + "]"
    return str(value)


def truthy(value: Any) -> bool:
    """Go's template truth: false, 0, nil, and empty strings, lists and maps are false."""
    if value is MISSING or value is None:
        return False
    if isinstance(value, (bool, int, float)):
        return bool(value)
    if isinstance(value, (str, list, tuple, Mapping)):
        return len(value) > 0
    return True


def _to_json(value: Any) -> str:
    if hasattr(value, "to_json"):
        value = value.to_json()
    return json.dumps(value, separators=(",", ":"), default=lambda o: o.to_json() if hasattr(o, "to_json") else str(o))


def _field(value: Any, name: str) -> Any:
    if value is None or value is MISSING:
        raise TemplateError(f"template: nil pointer evaluating .{name}")
    if isinstance(value, Mapping):
        return value.get(name, MISSING)
    attr = getattr(value, name, MISSING)
    if attr is MISSING:
        raise TemplateError(f"template: can't evaluate field {name} in type {type(value).__name__}")
    return attr


def _index(value: Any, *keys: Any) -> Any:
    for key in keys:
        if isinstance(value, Mapping):
            value = value.get(key, MISSING)
        elif isinstance(value, (list, tuple, str)) and isinstance(key, int):
            if not 0 <= key < len(value):
                raise TemplateError(f"template: index out of range: {key}")
            value = value[key]
        else:
            raise TemplateError(f"template: can't index item of type {type(value).__name__}")
    return value


def _printf(fmt: str, *args: Any) -> str:
    """Go's printf for %s %v %d %q %%."""
    out, i, arg = [], 0, 0
    while i < len(fmt):
        c = fmt[i]
        if c != "%" or i + 1 == len(fmt):
            out.append(c)
            i += 1
            continue
        verb = fmt[i + 1]
        i += 2
        if verb == "%":
            out.append("%")
            continue
        value = args[arg] if arg < len(args) else MISSING
        arg += 1
        if verb == "q":
            out.append(json.dumps(go_string(value)))
        elif verb == "d":
            out.append(str(int(value)) if isinstance(value, (int, float)) else f"%!d({go_string(value)})")
        else:
            out.append(go_string(value))
    return "".join(out)


def _compare(op: Callable[[Any, Any], bool]) -> Callable[..., bool]:
    def compare(a: Any, *rest: Any) -> bool:
        if op is _eq:  # eq a b c: a equals any of them
            return any(_eq(a, b) for b in rest)
        return all(op(a, b) for b in rest)
    return compare


def _eq(a: Any, b: Any) -> bool:
    return go_string(a) == go_string(b) if type(a) is not type(b) else a == b


FUNCS: dict[str, Callable[..., Any]] = {
    # docker's (cli/templates)
    "json": _to_json,
    "join": lambda items, sep: sep.join(go_string(i) for i in (items or [])),
    "split": lambda text, sep: go_string(text).split(sep),
    "lower": lambda text: go_string(text).lower(),
    "upper": lambda text: go_string(text).upper(),
    "title": lambda text: go_string(text).title(),
    "truncate": lambda text, n: go_string(text)[:int(n)],
    "pad": lambda text, left, right: " " * int(left) + go_string(text) + " " * int(right),
    "println": lambda *args: " ".join(go_string(a) for a in args) + "\n",
    # Go's builtins
    "print": lambda *args: "".join(go_string(a) for a in args),
    "printf": _printf,
    "index": _index,
    "len": lambda value: len(value) if value not in (None, MISSING) else 0,
    "not": lambda value: not truthy(value),
    "and": lambda *args: next((a for a in args if not truthy(a)), args[-1]),
    "or": lambda *args: next((a for a in args if truthy(a)), args[-1]),
    "eq": _compare(_eq),
    "ne": lambda a, b: not _eq(a, b),
    "lt": lambda a, b: a < b, "le": lambda a, b: a <= b, "gt": lambda a, b: a > b, "ge": lambda a, b: a >= b,
}


# ------------------------------------------------------------------- evaluation
class _Scope:
    def __init__(self, root: Any) -> None:
        self.vars: dict[str, Any] = {"$": root}


def _literal(tok: _Tok) -> Any:
    if tok.kind == "str":
        body = tok.text[1:-1]
        return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(1)), body)
    if tok.kind == "raw":
        return tok.text[1:-1]
    if tok.kind == "num":
        return float(tok.text) if "." in tok.text else int(tok.text)
    if tok.kind == "ident" and tok.text in ("true", "false"):
        return tok.text == "true"
    if tok.kind == "ident" and tok.text == "nil":
        return None
    raise TemplateError(f"template: unexpected {tok.text!r}")


def _fields(dot: Any, scope: _Scope, text: str, args: list[Any] | None = None) -> Any:
    """``.A.B`` on dot, ``$.A`` or ``$x.A`` on a variable; the last one called with ``args``
    if it is a method (``.Label "k"``)."""
    if text.startswith("$"):
        name, _, rest = text.partition(".")
        if name not in scope.vars:
            raise TemplateError(f"template: undefined variable {name}")
        value, names = scope.vars[name], [n for n in rest.split(".") if n]
    else:
        value, names = dot, [n for n in text.split(".") if n]
    for i, name in enumerate(names):
        value = _field(value, name)
        last = i == len(names) - 1
        if callable(value) and not isinstance(value, type):
            value = value(*(args or [])) if last else value()
        elif last and args:
            raise TemplateError(f"template: .{name} is not a method but has arguments")
    return value


def _operand(arg: Any, dot: Any, scope: _Scope) -> Any:
    if isinstance(arg, _Pipe):
        return _pipe(arg, dot, scope)
    if isinstance(arg, _Chain):
        return _fields(_pipe(arg.base, dot, scope), scope, arg.fields)
    if arg.kind == "field":
        return _fields(dot, scope, arg.text)
    if arg.kind == "var":
        if arg.text not in scope.vars:
            raise TemplateError(f"template: undefined variable {arg.text}")
        return scope.vars[arg.text]
    if arg.kind == "ident" and arg.text not in ("true", "false", "nil"):
        return _call(arg.text, [], dot, scope)
    return _literal(arg)


def _call(name: str, args: list[Any], dot: Any, scope: _Scope, piped: Any = MISSING) -> Any:
    fn = FUNCS.get(name)
    if fn is None:
        raise TemplateError(f'template: function "{name}" not defined')
    values = [_operand(a, dot, scope) for a in args] + ([] if piped is MISSING else [piped])
    try:
        return fn(*values)
    except TemplateError:
        raise
    except (TypeError, ValueError) as exc:
        raise TemplateError(f"template: error calling {name}: {exc}") from None


def _command(cmd: _Cmd, dot: Any, scope: _Scope, piped: Any = MISSING) -> Any:
    first, rest = cmd.args[0], cmd.args[1:]
    if isinstance(first, _Tok) and first.kind == "ident" and first.text not in ("true", "false", "nil"):
        return _call(first.text, rest, dot, scope, piped)
    if isinstance(first, _Tok) and first.kind == "field" and (rest or piped is not MISSING):
        args = [_operand(a, dot, scope) for a in rest] + ([] if piped is MISSING else [piped])
        return _fields(dot, scope, first.text, args)
    if rest or piped is not MISSING:
        raise TemplateError("template: can't give arguments to a non-function value")
    return _operand(first, dot, scope)


def _pipe(pipe: _Pipe, dot: Any, scope: _Scope) -> Any:
    value: Any = MISSING
    for i, cmd in enumerate(pipe.cmds):
        value = _command(cmd, dot, scope, MISSING if i == 0 else value)
    if pipe.assign:
        scope.vars[pipe.assign] = value
        return ""
    return value


def _run(nodes: list[_Node], dot: Any, scope: _Scope, out: list[str]) -> None:
    for node in nodes:
        if node.kind == "text":
            out.append(node.text)
        elif node.kind == "action":
            assert node.pipe is not None
            value = _pipe(node.pipe, dot, scope)
            if not node.pipe.assign:
                out.append(go_string(value))
        elif node.kind == "if":
            assert node.pipe is not None
            _run(node.body if truthy(_pipe(node.pipe, dot, scope)) else node.orelse, dot, scope, out)
        elif node.kind == "with":
            assert node.pipe is not None
            value = _pipe(node.pipe, dot, scope)
            if truthy(value):
                _run(node.body, value, scope, out)
            else:
                _run(node.orelse, dot, scope, out)
        elif node.kind == "range":
            assert node.pipe is not None
            value = _pipe(node.pipe, dot, scope)
            if value is MISSING or value is None:
                items = []
            elif isinstance(value, Mapping):
                items = [value[k] for k in sorted(value)]
            elif isinstance(value, (list, tuple)):
                items = list(value)
            else:
                raise TemplateError(f"template: range can't iterate over {go_string(value)}")
            if not items:
                _run(node.orelse, dot, scope, out)
            for item in items:
                _run(node.body, item, scope, out)


@dataclass
class Template:
    """A parsed format string."""

    source: str
    nodes: list[_Node]

    def render(self, data: Any) -> str:
        out: list[str] = []
        _run(self.nodes, data, _Scope(data), out)
        return "".join(out)


def parse(text: str) -> Template:
    return Template(text, _parse(text))


def render(text: str, data: Any) -> str:
    """Run the format string ``text`` on ``data`` (docker's ``-f``/``--format``)."""
    return parse(text).render(data)


# ------------------------------------------------------------------------- table
TABLE_MIN_WIDTH, TABLE_PADDING = 10, 3
"""docker's tabwriter settings (cli/command/formatter: NewWriter(out, 10, 1, 3, ' ', 0))."""


def align(lines: list[str]) -> list[str]:
    """Go's tabwriter as docker sets it: tab-separated cells padded to their column's width."""
    rows = [line.split("\t") for line in lines]
    widths: dict[int, int] = {}
    for cells in rows:
        for i, cell in enumerate(cells[:-1]):  # the last cell of a line is not a column
            widths[i] = max(widths.get(i, 0), len(cell) + TABLE_PADDING, TABLE_MIN_WIDTH)
    return ["".join(cell.ljust(widths[i]) for i, cell in enumerate(cells[:-1])) + cells[-1] for cells in rows]


def is_table(fmt: str) -> bool:
    return fmt.startswith("table")


def format_rows(fmt: str, items: list[Any], header: Any) -> list[str]:
    """Every item rendered with ``fmt``, one output line each (a row may span several lines);
    ``table FORMAT``: the header row (``header``: an object whose fields are the column titles)
    and the rows aligned in columns."""
    table_mode = is_table(fmt)
    body = fmt[len("table"):].lstrip() if table_mode else fmt
    body = body.replace("\\t", "\t").replace("\\n", "\n")  # as docker's CLI does for its flags
    template = parse(body)
    lines = []
    if table_mode:
        lines.extend(template.render(header).split("\n"))
    for item in items:
        lines.extend(template.render(item).split("\n"))
    return align(lines) if table_mode else lines
