"""The repository's own structure: cited spec sections exist in docs/, the package's import graph has
no cycles and imports its own modules at the top of files only."""

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "clinkd_jax")
SPEC = os.path.join(ROOT, "docs", "clinkd-spec.md")
# own modules imported inside a function on purpose: optional heavy dependencies
LAZY_ALLOWED = {("clinkd_jax.models.attention", "clinkd_jax.models.splash")}  # Pallas TPU kernels


def sources(*dirs):
    for d in dirs:
        for dirpath, _, files in os.walk(os.path.join(ROOT, d)):
            for f in files:
                if f.endswith((".py", ".md", ".sh")):
                    yield os.path.join(dirpath, f)


def module_name(path):
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def test_cited_spec_sections_exist():
    headings = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)[. ]", open(SPEC).read(), re.M))
    cited = {}
    for path in sources("clinkd_jax", "configs", "bench", "launch", "tests"):
        for m in re.finditer(r"clinkd-spec (§[\d.]+(?:\s*[-–/]\s*§?[\d.]+)?)", open(path).read()):
            for number in re.findall(r"\d+(?:\.\d+)?", m.group(1)):
                cited.setdefault(number.rstrip("."), []).append(os.path.relpath(path, ROOT))
    assert len(cited) >= 10  # the code does cite the spec
    missing = {n: where for n, where in cited.items() if n not in headings}
    assert not missing, f"cited but not in docs/clinkd-spec.md: {missing}"


def imports():
    """(module, imported own module, at top level?) for every import of the package's own modules."""
    modules = {module_name(p) for p in sources("clinkd_jax") if p.endswith(".py")}
    out = []
    for path in sources("clinkd_jax"):
        if not path.endswith(".py"):
            continue
        me = module_name(path)
        tree = ast.parse(open(path).read())
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                         for a in node.names]
            else:
                continue
            out += [(me, n, id(node) in top) for n in names if n in modules]
    return out


def test_no_import_cycles_and_no_late_imports():
    edges = imports()
    late = [(a, b) for a, b, at_top in edges if not at_top and (a, b) not in LAZY_ALLOWED]
    assert not late, f"imports of the package's own modules inside functions: {late}"
    graph = {}
    for a, b, at_top in edges:
        if at_top:
            graph.setdefault(a, set()).add(b)
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in graph.get(node, ()):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in list(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles
    # a stage's set-up sits below train/eval/infer
    below = {"clinkd_jax.stage", "clinkd_jax.model_source", "clinkd_jax.settings", "clinkd_jax.data",
             "clinkd_jax.models"}
    up = [(a, b) for a, b, _ in edges if any(a.startswith(x) for x in below)
          and b.startswith(("clinkd_jax.train", "clinkd_jax.eval", "clinkd_jax.infer", "clinkd_jax.recipe"))]
    assert not up, f"lower layers importing upper ones: {up}"
