"""Each default is defined in one place (chimein/, flows/, tasks/) and referenced everywhere else.

A literal counts as a definition where it fills a named slot: a parameter default, a keyword
argument (`chattiness=0.5 if chattiness is None else chattiness`), a dict value
(`{"threshold": 0.5}`), `.get("threshold", 0.5)`, an assignment or a pydantic `Field(...)`.
The same literal used otherwise (an asset name, a jitter factor) is not a default.

    .venv/bin/python tests/unit/base/test_defaults.py      # lists where each default is defined
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
SOURCES = sorted(p for d in ("chimein", "flows", "tasks") for p in (ROOT / d).rglob("*.py"))

# what: (literal, slot names it is a default of; None: any slot)
DEFAULTS = {
    "default preset": ("smollm2-135m-instruct", None),
    "compare presets": ("zephyr-7b-beta", None),
    "chattiness threshold": (0.5, r"chattiness|threshold"),
    "training output dir": ("outputs/train", None),
    "generated data dir": ("outputs/generated", None),
    "train config of the flows": ("offline-cpu", None),
    "OpenAI model": ("gpt-4o-mini", None),
}


def _name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return None


def _is_field(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and _name(node.func) == "Field"


def slot_of(node: ast.AST, parents: dict) -> str | None:
    """The name of the slot a literal fills as a default, or None."""
    while True:  # up through what passes a value on: containers, `a or b`, `a if c else b`, Field()
        parent = parents.get(node)
        if isinstance(parent, ast.keyword) and parent.arg == "default" and _is_field(parents.get(parent)):
            node = parents[parent]
        elif (_is_field(parent) and parent.args and node is parent.args[0]) or \
                isinstance(parent, (ast.List, ast.Tuple, ast.Set, ast.BoolOp)) or \
                (isinstance(parent, ast.IfExp) and node is not parent.test):
            node = parent
        else:
            break
    if isinstance(parent, ast.arguments):
        positional = parent.posonlyargs + parent.args
        pairs = list(zip(positional[len(positional) - len(parent.defaults):], parent.defaults))
        pairs += list(zip(parent.kwonlyargs, parent.kw_defaults))
        return next(a.arg for a, d in pairs if d is node)
    if isinstance(parent, ast.keyword):
        return parent.arg
    if isinstance(parent, ast.Dict):
        i = next((i for i, v in enumerate(parent.values) if v is node), None)
        return None if i is None or parent.keys[i] is None else _name(parent.keys[i])
    if isinstance(parent, ast.Call) and _name(parent.func) == "get" and len(parent.args) == 2 \
            and node is parent.args[1]:
        return _name(parent.args[0])
    if isinstance(parent, (ast.AnnAssign, ast.Assign)) and node is parent.value:
        targets = parent.targets if isinstance(parent, ast.Assign) else [parent.target]
        return _name(targets[0]) if len(targets) == 1 else None
    return None


def definitions() -> dict[str, list[str]]:
    """Where each default of DEFAULTS is defined: `path:line slot`."""
    found = {what: [] for what in DEFAULTS}
    for path in SOURCES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Constant) or isinstance(node.value, bool):
                continue
            for what, (value, slots) in DEFAULTS.items():
                if type(node.value) is type(value) and node.value == value:
                    slot = slot_of(node, parents)
                    if slot and (slots is None or re.search(slots, slot, re.I)):
                        found[what].append(f"{path.relative_to(ROOT)}:{node.lineno} {slot}")
    return found


FOUND = definitions()


@pytest.mark.parametrize("what", DEFAULTS)
def test_each_default_is_defined_once(what):
    places = FOUND[what]
    assert len(places) == 1, (f"{what} {DEFAULTS[what][0]!r} is defined in {len(places)} places "
                              f"({'; '.join(places) or 'none'}): define it once and import it")


def test_the_scan_finds_defaults_in_every_kind_of_slot():
    source = '''
def f(chattiness: float = 0.5, *, model="m"): ...
X = g(threshold=0.5 if y is None else y, timeout=0.5)
d = {"threshold": 0.5}
e = meta.get("threshold", 0.5)
class C:
    output_dir: str = Field("outputs/train", description="…")
    presets: list[str] = Field(["m", "n"])
sleep(0.5)
'''
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    slots = [(n.value, slot_of(n, parents)) for n in ast.walk(tree)
             if isinstance(n, ast.Constant) and n.value in (0.5, "m", "outputs/train")]
    assert sorted(slots, key=str) == sorted([
        (0.5, "chattiness"), ("m", "model"), (0.5, "threshold"), (0.5, "timeout"), (0.5, "threshold"),
        (0.5, "threshold"), ("outputs/train", "output_dir"), ("m", "presets"), (0.5, None)], key=str)


if __name__ == "__main__":
    for what, places in FOUND.items():
        print(f"{what} ({DEFAULTS[what][0]!r}):\n  " + "\n  ".join(places or ["(nowhere)"]))
