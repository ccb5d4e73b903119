"""`seedlings recipe`: a resolved recipe, every key with its value, its role, its range or choices and what it means.

What a key means is the comment beside its field in schema.py, read from the source: the comment stays the one
place that says it.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
from functools import cache

from seedlings.recipe.schema import CHOICES, RANGES, STAGE_CHOICES, STAGE_RANGES, TRAINS, Recipe, Stage


@cache
def field_comments(cls: type) -> dict[str, str]:
    """{field: its comment} of a dataclass, from the comment on the field's lines and the comment lines below it."""
    source = inspect.getsource(cls)
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    out = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            found = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
            n = node.end_lineno + 1
            while n - 1 < len(lines) and lines[n - 1].strip().startswith("#"):  # continuation lines: `    #   ...`
                found.append(comments[n])
                n += 1
            out[node.target.id] = " ".join(found)
    return out


def shown(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {shown(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(shown(v) for v in value) + "]"
    return str(value)


def bounds(name: str, ranges: dict, choices: dict) -> str:
    if name in choices:
        return " | ".join(choices[name])
    if name in ranges:
        low, high = ranges[name]
        return f"[{'-inf' if low is None else shown(low)}, {'inf' if high is None else shown(high)}]"
    return ""


def key_lines(key: str, value, role: str, allowed: str, comment: str) -> list[str]:
    facts = "; ".join(part for part in (role, allowed and f"allowed {allowed}", comment) if part)
    return [f"{key}: {shown(value)}", *textwrap.wrap(facts, 116, initial_indent="    ", subsequent_indent="    ")]


def describe(recipe: Recipe) -> list[str]:
    """Per key, `key: value`, then its role, range or choices, and its meaning; stages key by key."""
    lines = []
    comments, stage_comments = field_comments(Recipe), field_comments(Stage)
    for f in dataclasses.fields(Recipe):
        if f.name == "stages":
            continue
        role = f.metadata.get("role", TRAINS)
        lines += key_lines(f.name, getattr(recipe, f.name), role, bounds(f.name, RANGES, CHOICES), comments[f.name])
    lines.append(f"stages: {len(recipe.stages)}, in order ({comments['stages']})")
    for i, stage in enumerate(recipe.stages):
        for f in dataclasses.fields(Stage):
            allowed = bounds(f.name, STAGE_RANGES, STAGE_CHOICES)
            lines += key_lines(f"stages.{i}.{f.name}", getattr(stage, f.name), TRAINS, allowed, stage_comments[f.name])
    return lines
