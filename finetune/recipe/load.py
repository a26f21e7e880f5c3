"""Reading a recipe: YAML with line numbers, `${ENV}` expansion, `--set` overrides, schema
validation and resource checks, all problems reported in one pass as

    recipes/x.yaml:12: optim.lr.strat: unknown key; did you mean 'start'?

Relative paths in a recipe are resolved against the working directory (run recipes from the
repository root, as the README does).
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import RecipeError
from .schema import Recipe

ENV_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
Loc = tuple


# ------------------------------------------------------------------------- YAML with lines

def _line_map(node, path: Loc, lines: dict, problems: list) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                problems.append((path + (key,), key_node.start_mark.line + 1,
                                 "key appears twice; the later value would silently win"))
            seen.add(key)
            lines[path + (key,)] = key_node.start_mark.line + 1
            _line_map(value_node, path + (key,), lines, problems)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[path + (i,)] = item.start_mark.line + 1
            _line_map(item, path + (i,), lines, problems)


def _expand_env(value, path: Loc, problems: list):
    if isinstance(value, dict):
        return {k: _expand_env(v, path + (k,), problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, path + (i,), problems) for i, v in enumerate(value)]
    if isinstance(value, str):
        def repl(match):
            name = match.group(1)
            if name not in os.environ:
                problems.append((path, f"environment variable ${{{name}}} is not set; export it or use --set"))
                return match.group(0)
            return os.environ[name]
        return ENV_VAR.sub(repl, value)
    return value


def _apply_override(raw: dict, assignment: str) -> Loc:
    if "=" not in assignment:
        raise RecipeError(f"--set {assignment}: expected key.path=value")
    dotted, text = assignment.split("=", 1)
    keys: list = [int(k) if k.isdigit() else k for k in dotted.strip().split(".")]
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = raw
    for i, key in enumerate(keys[:-1]):
        nxt = keys[i + 1]
        if isinstance(node, list):
            if not isinstance(key, int) or key >= len(node):
                raise RecipeError(f"--set {dotted}: index {key} is out of range (list has {len(node)} items)")
            node = node[key]
        else:
            if not isinstance(node.get(key), (dict, list)):
                node[key] = [] if isinstance(nxt, int) else {}
            node = node[key]
    last = keys[-1]
    if isinstance(node, list):
        if not isinstance(last, int) or last >= len(node):
            raise RecipeError(f"--set {dotted}: index {last} is out of range")
    node[last] = value
    return tuple(keys)


# ------------------------------------------------------------------------- schema errors

def _field_model(model: type[BaseModel], loc: Loc):
    """The pydantic model class that owns the last element of `loc` (for 'did you mean')."""
    current = model
    for part in loc[:-1]:
        if isinstance(part, int) or current is None:
            continue
        field = current.model_fields.get(part)
        if field is None:
            return None
        current = _first_model(field.annotation)
    return current


def _first_model(annotation):
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _first_model(arg)
        if found is not None:
            return found
    return None


def _describe(err: dict) -> str:
    kind = err["type"]
    loc = err["loc"]
    if kind == "extra_forbidden":
        owner = _field_model(Recipe, loc)
        known = list(owner.model_fields) if owner else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else (f"; known keys: {', '.join(known)}" if known else "")
        return f"unknown key{hint}"
    if kind == "missing":
        return "required key is missing"
    message = err["msg"]
    if "input" in err and kind not in ("missing",) and not isinstance(err["input"], (dict, list)):
        message += f" (got {err['input']!r})"
    return message


def _clean_loc(loc: Loc) -> Loc:
    # pydantic adds union/tagged branch names such as 'function-after[...]' to locations.
    return tuple(p for p in loc if isinstance(p, int) or not re.match(r"^[a-z-]+\[", str(p)))


# ------------------------------------------------------------------------- public API

class LoadedRecipe:
    """A validated recipe with its source, resolved form and hash."""

    def __init__(self, recipe: Recipe, source: Path):
        self.recipe = recipe
        self.source = source
        self.resolved = recipe.model_dump(mode="json")
        canonical = json.dumps(self.resolved, sort_keys=True, separators=(",", ":"))
        self.hash = hashlib.sha256(canonical.encode()).hexdigest()

    def resolved_yaml(self) -> str:
        header = f"# resolved from {self.source}; sha256 {self.hash}\n"
        return header + yaml.safe_dump(self.resolved, sort_keys=False)


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None,
                check_resources: bool = True) -> LoadedRecipe:
    """Parse, expand, override, validate; raise `RecipeError` listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{path}{line}: YAML syntax error: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}:1: the recipe must be a mapping of keys (got {type(raw).__name__})")

    lines: dict[Loc, int] = {}
    dup_problems: list = []
    if node is not None:
        _line_map(node, (), lines, dup_problems)
    problems: list[tuple[Loc, str]] = []
    raw = _expand_env(raw, (), problems)
    overridden: set[Loc] = set()
    for assignment in overrides or []:
        overridden.add(_apply_override(raw, assignment))

    def where(loc: Loc) -> str:
        for i in range(len(loc), 0, -1):
            if loc[:i] in overridden:
                return "--set"
        for i in range(len(loc), -1, -1):
            if loc[:i] in lines:
                return f"{path}:{lines[loc[:i]]}"
        return f"{path}:1"

    messages = [f"{path}:{line}: {'.'.join(map(str, loc))}: {msg}" for loc, line, msg in dup_problems]
    messages += [f"{where(loc)}: {'.'.join(map(str, loc))}: {msg}" for loc, msg in problems]
    recipe = None
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        for err in exc.errors():
            loc = _clean_loc(err["loc"])
            messages.append(f"{where(loc)}: {'.'.join(map(str, loc)) or '(top)'}: {_describe(err)}")
    if recipe is not None:
        found = recipe.check()
        if check_resources and not found:
            from .resources import check_resources as check
            found += check(recipe)
        for loc, msg in found:
            messages.append(f"{where(loc)}: {'.'.join(map(str, loc))}: {msg}")
    if messages:
        raise RecipeError(*messages)
    return LoadedRecipe(recipe, path)
