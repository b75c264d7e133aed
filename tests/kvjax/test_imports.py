"""The runtime path stays free of torch (an optional extra), does no work at import, and no
modules import each other (directly or around a loop)."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = ("kvjax", "training", "inference", "pallas_kernels")


def test_importing_kvjax_imports_neither_torch_nor_transformers():
    code = ("import sys, kvjax, kvjax.chat, kvjax.session, kvjax.testing, kvjax.loading, kvjax.vision; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def module_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (anywhere in the file, lazy imports included)."""
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in files}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                subs = {f"{node.module}.{a.name}" for a in node.names} & files.keys()
                edges |= subs or ({node.module} & files.keys())
        graph[name] = edges - {name}
    return graph


def test_no_import_cycles():
    graph, state, cycles = module_graph(), {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert len(graph) > 60 and not cycles, cycles


def test_only_the_cli_reaches_into_training_and_inference():
    graph = module_graph()
    offenders = {m: sorted(e for e in edges if e.split(".")[0] in ("training", "inference"))
                 for m, edges in graph.items() if m.startswith("kvjax") and not m.startswith("kvjax.cli")}
    assert not {m: e for m, e in offenders.items() if e}
