"""A small renderer of Go's text/template, the part of it Ollama's TEMPLATEs use: text, `{{- … -}}` trimming,
`.Field` / `$.Field` / `$var`, `$x := …`, `if` / `else` / `end`, `range $i, $_ := …`, and the functions eq, ne, and,
or, not, len, slice. Enough to render our Modelfile templates the way Ollama would, here where Go is absent."""
from __future__ import annotations

import re
from typing import Any

ACTION = re.compile(r"{{(-\s)?(.*?)(\s-)?}}", re.S)
TOKEN = re.compile(r'\(|\)|"(?:[^"\\]|\\.)*"|[^\s()]+')


def render(template: str, data: dict[str, Any]) -> str:
    nodes, _ = _parse(_lex(template), 0)
    out: list[str] = []
    _run(nodes, data, {"$": data}, out)
    return "".join(out)


def _lex(template: str) -> list[tuple[str, str]]:
    parts: list[tuple[str, str]] = []
    position = 0
    for match in ACTION.finditer(template):
        text = template[position:match.start()]
        if match.group(1):
            text = text.rstrip()
        parts.append(("text", text))
        parts.append(("action", match.group(2).strip()))
        position = match.end()
        if match.group(3):
            rest = template[position:]
            position += len(rest) - len(rest.lstrip())
    parts.append(("text", template[position:]))
    return parts


def _parse(parts: list[tuple[str, str]], index: int) -> tuple[list[Any], int]:
    nodes: list[Any] = []
    while index < len(parts):
        kind, value = parts[index]
        index += 1
        if kind == "text":
            nodes.append(("text", value))
        elif value in ("end", "else"):
            return nodes + [(value,)], index
        elif value.startswith(("if ", "range ")):
            word, rest = value.split(" ", 1)
            body, index = _parse(parts, index)
            other: list[Any] = []
            if body and body[-1] == ("else",):
                other, index = _parse(parts, index)
            nodes.append((word, rest, [n for n in body if n[0] not in ("end", "else")],
                          [n for n in other if n[0] != "end"]))
        elif re.match(r"^\$\w+\s*:=", value):
            name, expr = value.split(":=", 1)
            nodes.append(("set", name.strip(), expr.strip()))
        else:
            nodes.append(("out", value))
    return nodes, index


def _run(nodes: list[Any], dot: Any, variables: dict[str, Any], out: list[str]) -> None:
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "out":
            out.append(str(_eval(node[1], dot, variables)))
        elif node[0] == "set":
            variables[node[1]] = _eval(node[2], dot, variables)
        elif node[0] == "if":
            _run(node[2] if _truthy(_eval(node[1], dot, variables)) else node[3], dot, variables, out)
        elif node[0] == "range":
            names, expr = ([], node[1]) if ":=" not in node[1] else node[1].split(":=", 1)
            names = [n.strip() for n in names.split(",")] if names else []
            items = _eval(expr.strip(), dot, variables)
            for i, item in enumerate(items):
                inner = dict(variables)
                if len(names) == 2:
                    inner[names[0]], inner[names[1]] = i, item
                elif names:
                    inner[names[0]] = item
                _run(node[2], item, inner, out)


def _eval(expr: str, dot: Any, variables: dict[str, Any]) -> Any:
    value, rest = _command(TOKEN.findall(expr), dot, variables)
    assert not rest, f"unparsed {rest} in {expr!r}"
    return value


FUNCTIONS = {"eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "and": lambda *a: all(map(_truthy, a)),
             "or": lambda *a: any(map(_truthy, a)), "not": lambda a: not _truthy(a), "len": len,
             "slice": lambda x, i, j=None: x[i:j]}


def _command(tokens: list[str], dot: Any, variables: dict[str, Any]) -> tuple[Any, list[str]]:
    if tokens and tokens[0] in FUNCTIONS:
        name, tokens, args = tokens[0], tokens[1:], []
        while tokens and tokens[0] != ")":
            arg, tokens = _operand(tokens, dot, variables)
            args.append(arg)
        return FUNCTIONS[name](*args), tokens
    return _operand(tokens, dot, variables)


def _operand(tokens: list[str], dot: Any, variables: dict[str, Any]) -> tuple[Any, list[str]]:
    token, tokens = tokens[0], tokens[1:]
    if token == "(":
        value, tokens = _command(tokens, dot, variables)
        return value, tokens[1:]
    if token.startswith('"'):
        return bytes(token[1:-1], "utf-8").decode("unicode_escape"), tokens
    if token.isdigit():
        return int(token), tokens
    head, *fields = token.split(".")
    value = dot if head == "" else variables[head]
    for name in fields:
        if name:
            value = value[name] if isinstance(value, dict) else getattr(value, name)
    return value, tokens


def _truthy(value: Any) -> bool:
    return bool(value)
