"""train/ is a package of library modules (loop, objectives, checkpoint, schedule) and scripts (pretrain, distill,
decode_orders, student_states): no import cycle between them, no sys.path edits, and every script runs from any directory
(the project is installed, so `import train` works without them)."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "train"
SCRIPTS = ("pretrain", "distill", "decode_orders", "student_states")


def train_imports(path: Path) -> set[str]:
    """The train.* modules a file imports anywhere in it (function-level imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("train."):
            out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("train."))
    return out


def test_no_import_cycle_in_train():
    graph = {p.stem: train_imports(p) for p in TRAIN.glob("*.py")}
    done, on_path = set(), []

    def visit(m):
        if m in on_path:
            raise AssertionError("import cycle: " + " -> ".join(on_path[on_path.index(m):] + [m]))
        if m in done:
            return
        on_path.append(m)
        for n in sorted(graph.get(m, ())):
            visit(n)
        on_path.pop()
        done.add(m)
    for m in sorted(graph):
        visit(m)
    # the library modules never import a script
    for lib in ("loop", "objectives", "checkpoint", "schedule"):
        assert not graph[lib] & set(SCRIPTS), (lib, graph[lib])


def test_no_sys_path_edits_in_train():
    assert [p.name for p in TRAIN.glob("*.py") if "sys.path" in p.read_text()] == []


def test_the_loss_imports_nothing_per_step():
    """compute_loss runs every step: its imports are the module's, not the function's."""
    tree = ast.parse((TRAIN / "objectives.py").read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "compute_loss")
    assert not [n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))]


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_run_from_another_directory(script, tmp_path):
    r = subprocess.run([sys.executable, str(TRAIN / f"{script}.py"), "--help"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "usage:" in r.stdout, r.stderr[-2000:]
