"""`litlab models`, and the early checks of `litlab run`, without importing the chapters: the
registered models, and each registered model's and data module's arguments with their types, read
from the source.

Importing every chapter (torch, Lightning, torch_geometric, gymnasium, datasets, ...) to fill the
registry takes 10-20 s on a laptop; reading the `@register_model(...)` calls of
`litlab/chapters/**/*.py` with `ast` takes about 0.1 s and imports nothing heavy. The name, chapter
and description must then be string literals, concatenations of them, or module-level string
constants (also through `from module import NAME`); a module that registers a model in any other
way is imported and its entries are read from the registry (slow but exact). tests/test_performance.py
checks that the index equals the registry.
"""

from __future__ import annotations

import ast
import functools
import importlib
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from litlab.schema import Range

PACKAGE_ROOT = Path(__file__).resolve().parent  # .../litlab
CHAPTERS = PACKAGE_ROOT / "chapters"


@dataclass(frozen=True)
class ModelInfo:
    name: str
    chapter: str
    description: str
    module: str  # the module that registers it, e.g. litlab.chapters.mlp.module


class _Unresolved(Exception):
    pass


class _SourceModule:
    """One parsed file: its module-level string constants and `from X import Y` names."""

    def __init__(self, path: Path, index: _SourceIndex):
        self.path, self.index = path, index
        self.name = module_name(path)
        self.text = path.read_text(encoding="utf-8")
        self.tree = ast.parse(self.text, filename=str(path))
        self.assigned: dict[str, ast.expr] = {}
        self.imported: dict[str, tuple[str, str]] = {}  # local name -> (module, name)
        for node in self.tree.body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                self.assigned[node.targets[0].id] = node.value
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
                self.assigned[node.target.id] = node.value
            elif isinstance(node, ast.ImportFrom) and node.module:
                base = node.module if node.level == 0 else _relative(self.name, node.level, node.module, path)
                for alias in node.names:
                    self.imported[alias.asname or alias.name] = (base, alias.name)

    def constant(self, name: str, depth: int = 0) -> str:
        if depth > 8:
            raise _Unresolved(name)
        if name in self.assigned:
            return self.evaluate(self.assigned[name], depth + 1)
        if name in self.imported:
            module, attr = self.imported[name]
            source = self.index.module(module)
            if source is None:
                raise _Unresolved(f"{module}.{attr}")
            return source.constant(attr, depth + 1)
        raise _Unresolved(name)

    def evaluate(self, node: ast.expr, depth: int = 0) -> str:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return self.evaluate(node.left, depth) + self.evaluate(node.right, depth)
        if isinstance(node, ast.Name):
            return self.constant(node.id, depth)
        raise _Unresolved(ast.dump(node)[:80])

    def registrations(self) -> list[ModelInfo] | None:
        """The models this file registers; None if one of them cannot be read without importing."""
        out = []
        for node in self._register_calls():
            try:
                if not node.args:
                    raise _Unresolved("no name")
                kw = {k.arg: k.value for k in node.keywords if k.arg}
                out.append(ModelInfo(self.evaluate(node.args[0]), self.evaluate(kw["chapter"]),
                                     self.evaluate(kw["description"]), self.name))
            except (_Unresolved, KeyError):
                return None
        return out

    def init_arguments(self, register: str) -> dict[str, dict[str, Any] | None] | None:
        """{registered name: {argument: its type (annotation_type)} of the class's own __init__ (what
        config.resolve_args checks a section against), or None where the class inherits its __init__} for the classes
        this file decorates with `register` (register_model or register_data); None if a name
        cannot be read or the function is called elsewhere than on a top-level class."""
        out: dict[str, dict[str, Any] | None] = {}
        decorated = [(node, d) for node in self.tree.body if isinstance(node, ast.ClassDef)
                     for d in node.decorator_list
                     if isinstance(d, ast.Call) and _called_name(d.func) == register]
        if len(decorated) < self.text.count(f"{register}("):
            return None
        for cls, call in decorated:
            try:
                name = self.evaluate(call.args[0]) if call.args else None
            except _Unresolved:
                return None
            if name is None:
                return None
            init = next((f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == "__init__"), None)
            if init is None:
                out[name] = None
                continue
            a = init.args
            params = [*a.posonlyargs, *a.args, *a.kwonlyargs][1:]  # without self
            out[name] = {p.arg: self.annotation_type(p.annotation) for p in params}
        return out

    def annotation_type(self, node: ast.expr | None) -> Any:
        """The type an argument's annotation names, as typing.get_type_hints would give it, for
        what schema.check understands (int, float, bool, str, None, Literal, Annotated with Range,
        Optional/Union or |, list, tuple, dict), through module-level aliases and imports within
        litlab; typing.Any (no check) for anything else or anything not readable here."""
        if node is None:
            return Any
        try:
            return self._type(node, 0)
        except (_Unresolved, TypeError, ValueError, SyntaxError):
            return Any

    def _type(self, node: ast.expr, depth: int) -> Any:
        if depth > 16:
            raise _Unresolved("too deep")
        if isinstance(node, ast.Constant):
            if node.value is None:
                return type(None)
            if isinstance(node.value, str):  # a string annotation: its expression
                return self._type(ast.parse(node.value, mode="eval").body, depth + 1)
            raise _Unresolved(repr(node.value))
        if isinstance(node, ast.Name):
            return self._named(node.id, depth)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "typing":
            return _from_module("typing", node.attr)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            return self._type(node.left, depth + 1) | self._type(node.right, depth + 1)
        if isinstance(node, ast.Subscript):
            base = self._type(node.value, depth + 1)
            items = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
            if base is Literal:
                return Literal[tuple(_literal(item) for item in items)]
            if base is Annotated:
                meta = [self._range(m) for m in items[1:] if isinstance(m, ast.Call)]
                return Annotated[(self._type(items[0], depth + 1), *[m for m in meta if m is not None])]
            args = tuple(Ellipsis if isinstance(i, ast.Constant) and i.value is Ellipsis else self._type(i, depth + 1)
                         for i in items)
            if base in (Optional, Union, list, tuple, dict):
                return base[args if len(args) > 1 else args[0]]
        raise _Unresolved(ast.dump(node)[:80])

    def _named(self, name: str, depth: int) -> Any:
        if name in self.assigned:  # a module-level alias: Hidden = Annotated[int, Range(ge=1)]
            return self._type(self.assigned[name], depth + 1)
        if name in self.imported:
            module, attr = self.imported[name]
            if module in ("typing", "typing_extensions", "litlab.schema"):
                return _from_module(module, attr)
            source = self.index.module(module)
            if source is None:
                raise _Unresolved(f"{module}.{attr}")
            return source._named(attr, depth + 1)
        if name in _BUILTIN_TYPES:
            return _BUILTIN_TYPES[name]
        raise _Unresolved(name)

    def _range(self, call: ast.Call) -> Range | None:
        """Range(ge=..., ...) with number literals; None for any other metadata (schema.check
        reads only Range)."""
        if _called_name(call.func) != "Range" or self._named("Range", 0) is not Range:
            return None
        if call.args:
            raise _Unresolved("Range with positional arguments")
        return Range(**{k.arg: _literal(k.value) for k in call.keywords})

    def _register_calls(self) -> list[ast.Call]:
        """The register_model(...) calls: the decorators of top-level classes (walking every node
        of the tree costs 3x the parse; done only if the text has calls elsewhere)."""
        def is_call(node) -> bool:
            return isinstance(node, ast.Call) and _called_name(node.func) == "register_model"

        calls = [d for node in self.tree.body if isinstance(node, (ast.ClassDef, ast.FunctionDef))
                 for d in node.decorator_list if is_call(d)]
        if len(calls) < self.text.count("register_model("):
            calls = [node for node in ast.walk(self.tree) if is_call(node)]
        return calls


class _SourceIndex:
    def __init__(self, root: Path):
        self.root = root
        self._modules: dict[str, _SourceModule | None] = {}

    def module(self, name: str) -> _SourceModule | None:
        if name not in self._modules:
            path = module_path(name)
            self._modules[name] = _SourceModule(path, self) if path is not None else None
        return self._modules[name]


_BUILTIN_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "list": list, "tuple": tuple, "dict": dict}


def _from_module(module: str, attr: str) -> Any:
    known = {"Any": Any, "Literal": Literal, "Annotated": Annotated, "Optional": Optional, "Union": Union,
             "Range": Range}
    if attr not in known or (attr == "Range") != (module == "litlab.schema"):
        raise _Unresolved(f"{module}.{attr}")
    return known[attr]


_ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
               ast.Pow: operator.pow}


def _literal(node: ast.expr) -> Any:
    """A literal value: a constant, or arithmetic on numbers (-1, 2**32, 10 * 1000)."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_number(node.operand)
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
        left, right = _number(node.left), _number(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 256:
            raise _Unresolved("a huge power")
        return _ARITHMETIC[type(node.op)](left, right)
    raise _Unresolved(ast.dump(node)[:80])


def _number(node: ast.expr) -> int | float:
    value = _literal(node)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Unresolved(repr(value))
    return value


def module_name(path: Path) -> str:
    rel = path.resolve().relative_to(PACKAGE_ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def module_path(name: str) -> Path | None:
    if not name.startswith("litlab"):
        return None
    base = PACKAGE_ROOT.parent.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _relative(current: str, level: int, module: str, path: Path) -> str:
    package = current if path.name == "__init__.py" else current.rpartition(".")[0]
    for _ in range(level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{module}" if module else package


def _called_name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def registered_models(root: Path = CHAPTERS, chapter: str | None = None) -> list[ModelInfo]:
    """Every model registered under `root`, mostly without imports, in course order: by chapter
    number (1-2, 3, ..., 10, 11, 12, not as strings), then name. `chapter`: only the models whose
    chapter contains that text (any case); a UserError listing the chapters when none does."""
    index = _SourceIndex(root)
    found: list[ModelInfo] = []
    for path in sorted(root.rglob("*.py")):
        if "register_model" not in path.read_text(encoding="utf-8"):
            continue
        source = index.module(module_name(path))
        entries = source.registrations() if source is not None else None
        if entries is None:  # not readable from the source: import it and ask the registry
            entries = _imported_entries(module_name(path))
        found.extend(entries)
    found.sort(key=lambda e: (chapter_order(e.chapter), e.name))
    if chapter:
        chosen = [e for e in found if chapter.lower() in e.chapter.lower()]
        if not chosen:
            from litlab.errors import UserError

            chapters = ", ".join(dict.fromkeys(e.chapter for e in found)) or "(none)"
            raise UserError(f"--chapter {chapter!r}: no model's chapter contains it; chapters: {chapters}")
        return chosen
    return found


def chapter_order(chapter: str) -> tuple:
    """'1-2 MLPs' < '3 CNNs' < '10 GNNs': the leading chapter number(s), then the text; unnumbered last."""
    import re

    m = re.match(r"\s*(\d+)(?:\s*-\s*(\d+))?", chapter)
    if m is None:
        return (1, 0, 0, chapter)
    return (0, int(m.group(1)), int(m.group(2) or m.group(1)), chapter)


def _imported_entries(module: str) -> list[ModelInfo]:
    from litlab import registry

    importlib.import_module(module)
    return [ModelInfo(e.name, e.chapter, e.description, module) for e in registry.MODELS.values()
            if e.cls.__module__ == module]


@functools.cache  # the package's source does not change while it runs (a sweep checks many configs)
def registered_arguments() -> dict[str, dict[str, dict[str, Any] | None]] | None:
    """{"model": ..., "data": ...}: init_arguments of every file of the package (chapters and
    data), every registered model (register_model) and data module (register_data) without
    importing one; None if one file cannot be read that way (then only the registry knows)."""
    index = _SourceIndex(PACKAGE_ROOT)
    found: dict[str, dict[str, dict[str, Any] | None]] = {"model": {}, "data": {}}
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        if path.name in ("registry.py", "model_index.py"):
            continue
        text = path.read_text(encoding="utf-8")
        for kind in found:
            if f"register_{kind}(" in text:
                source = index.module(module_name(path))
                entries = source.init_arguments(f"register_{kind}") if source is not None else None
                if entries is None:
                    return None
                found[kind].update(entries)
    return found


def check_names_and_arguments(raw: dict) -> None:
    """data.name, model.name, the names of their arguments and the values given to them checked
    against the source (after config.precheck, before the ~10 s import of Lightning that the
    registry needs), in the order config.validate checks them and with its messages (the same
    schema.check). A name given as an import path (package.module:Class), a class inheriting its
    __init__, and an argument whose type is not readable from the source are left to validate."""
    from litlab.errors import unknown_argument, unknown_name
    from litlab.registry import IMPORT_PATH
    from litlab.schema import check

    known = registered_arguments()
    if known is None:
        return
    for section in ("data", "model"):
        body = raw[section]
        name = body["name"]
        if isinstance(name, str) and IMPORT_PATH.match(name):
            continue
        if not isinstance(name, str) or name not in known[section]:
            raise unknown_name(section, name, known[section])
        arguments = known[section][name]
        if arguments is None:
            continue
        for key in body:
            if key != "name" and key not in arguments:
                raise unknown_argument(section, name, key, list(arguments))
        for key, tp in arguments.items():  # in the signature's order, as resolve_args
            if key in body and tp is not Any:
                check(body[key], tp, f"{section}.{key}")
