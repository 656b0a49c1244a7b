"""Every user-visible flag in --help is exercised by at least one test.

A flag counts as exercised when some test passes it to its command: a list literal in a
test file that starts with the command's name (["export", ..., "--seed", "3"]), or a call
invoke("export", ..., "--seed", 3), holds the flag. An option read from an environment variable also counts when a test sets that variable.
A new flag without such a test fails here, with the list of what is missing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import typer

from labelassist.cli import app

TESTS = Path(__file__).parent


def command_options(command, prefix=()) -> dict[tuple[str, ...], list[list[str]]]:
    """(command path) -> its options, each as the list of its spellings."""
    if hasattr(command, "commands"):
        found = {}
        for name, sub in command.commands.items():
            found.update(command_options(sub, (*prefix, name)))
        return found
    return {prefix: [p.opts + p.secondary_opts + ([p.envvar] if isinstance(p.envvar, str)
                                                  else list(p.envvar or []))
                     for p in command.params
                     if getattr(p, "param_type_name", "") == "option"
                     and "--help" not in p.opts]}


def flags_passed_in_tests() -> dict[tuple[str, ...], set[str]]:
    passed: dict[tuple[str, ...], set[str]] = {}
    for path in TESTS.glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.List):
                elements = node.elts
            elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "invoke":
                elements = node.args  # invoke("export", out, "--seed", 3)
            else:
                continue
            words = [e.value for e in elements
                     if isinstance(e, ast.Constant) and isinstance(e.value, str)]
            if words[:2] == ["-m", "labelassist.cli"]:  # [sys.executable, "-m", ...]
                words = words[2:]
            elif not words or words[0] != getattr(elements[0], "value", None):
                continue  # the command's name must come first
            head = tuple(w for w in words[:2] if not w.startswith("-"))
            for flag in (w.split("=", 1)[0] for w in words if w.startswith("--")):
                for n in (1, 2):
                    passed.setdefault(head[:n], set()).add(flag)
    return passed


def env_vars_set_in_tests() -> set[str]:
    """Names given a value in a test (an env dict key, monkeypatch.setenv): an option that
    reads an environment variable is exercised through it too."""
    names = set()
    for path in TESTS.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and node.value.isupper() and node.value.replace("_", "").isalnum():
                names.add(node.value)
    return names


def test_every_flag_is_passed_by_some_test():
    passed = flags_passed_in_tests()
    env = env_vars_set_in_tests()
    missing = [f"{' '.join(cmd)} {spellings[0]}"
               for cmd, options in command_options(typer.main.get_command(app)).items()
               for spellings in options
               if not set(spellings) & (passed.get(cmd, set()) | env)]
    assert missing == [], "flags that no test passes to their command:\n" + "\n".join(missing)
