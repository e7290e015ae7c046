"""The shape the code keeps (issue 8): short functions, one home for collectives, a loop on one screen."""

import ast
import re

from conftest import REPO

MNR = sorted((REPO / "mnr").rglob("*.py"))  # the packages too (mnr/store/)


def _functions(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_no_function_in_mnr_is_over_60_lines():
    long = [f"{p.name}:{f.name} ({f.end_lineno - f.lineno + 1} lines)" for p in MNR for f in _functions(p)
            if f.end_lineno - f.lineno + 1 > 60]
    assert not long, long


def test_the_training_loop_fits_one_screen_with_its_stages_marked():
    (loop,) = [f for f in _functions(REPO / "mnr" / "train.py") if f.name == "train"]
    assert loop.end_lineno - loop.lineno + 1 <= 60
    body = "\n".join((REPO / "mnr" / "train.py").read_text().splitlines()[loop.lineno - 1:loop.end_lineno])
    for stage in ("# forward and backward", "# check", "# step", "# log", "# evaluate", "# save", "# stop"):
        assert stage in body, stage


# distributed.py: every process-group call; sharding.py: FSDP2 (fully_shard, distributed checkpoint), whose
# functions are collective by contract and say so
COLLECTIVE_HOMES = {"distributed.py", "sharding.py"}


def test_collectives_only_in_distributed_py_and_sharding_py():
    pattern = re.compile(r"torch\.distributed|\bdist\.")
    found = [f"{p.name}:{i}" for p in MNR if p.name not in COLLECTIVE_HOMES
             for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert not found, found


def test_no_module_imports_another_modules_private_name():
    found = []
    for path in sorted((REPO / "mnr").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mnr"):
                found += [f"{path.name}: from {node.module} import {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert not found, found
