"""The package's shape: one installed namespace, layers that only import downwards, no import cycle.

Every `import` counts, function-level ones included: a cycle hidden in a function body still
means two modules cannot be understood (or tested) apart.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("export", "runtime", "calib")  # repository folders, installed as scarlet_deploy.<name>
NS = "scarlet_deploy"

# Lower layers first; a module may import its own layer or any below it.
LAYERS = (
    ("foundations", ("runtime.core",)),
    ("data, runners, measuring", ("runtime.data", "runtime.runners", "runtime.measure", "runtime.peak", "runtime.flops")),
    ("export", ("export",)),
    ("calibration", ("calib",)),
    ("workflows", ("runtime",)),
    ("CLI", ("runtime.cli", "export.cli", "calib.cli", "runtime.tensorrt_cli", "runtime.verify.cli",
             "runtime.bench.cli", "runtime.serve.cli", "runtime.deploy.cli")),
)


def module_files() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([NS, *parts])] = path
    return out


def _is_package(module: str, files: dict[str, Path]) -> bool:
    return files[module].name == "__init__.py"


def imports_of(module: str, files: dict[str, Path]) -> set[str]:
    """Our modules that `module` imports anywhere in its file (resolved to files, not packages, where possible)."""
    tree = ast.parse(files[module].read_text())
    package = module if _is_package(module, files) else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in files and "." in t:  # `import a.b.c` of a package: the deepest file named
                t = t.rpartition(".")[0]
            if t in files and t != module:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    files = module_files()
    return {m: imports_of(m, files) for m in files}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in g:
        if root in index:
            continue
        work = [(root, iter(sorted(g[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        x = stack.pop()
                        on_stack.discard(x)
                        comp.append(x)
                        if x == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
            elif w not in index:
                index[w] = low[w] = counter
                counter += 1
                stack.append(w)
                on_stack.add(w)
                work.append((w, iter(sorted(g.get(w, ())))))
            elif w in on_stack:
                low[v] = min(low[v], index[w])
    return out


def layer_of(module: str) -> int:
    name = module.removeprefix(NS + ".")
    best, best_len = None, -1
    for rank, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and len(p) > best_len:
                best, best_len = rank, len(p)
    assert best is not None, f"{module} belongs to no layer; add it to LAYERS"
    return best


def test_no_import_cycle():
    found = cycles(graph())
    assert not found, "import cycles (every import counted, function-level ones too): " + "; ".join(
        " <-> ".join(c) for c in found)


def test_cycle_detector_finds_a_cycle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(g) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_layers_import_only_downwards():
    upward = []
    for m, deps in graph().items():
        for d in deps:
            if layer_of(d) > layer_of(m):
                upward.append(f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})")
    assert not upward, "\n".join(sorted(upward))


@pytest.mark.parametrize("path", sorted(p for pkg in (*PACKAGES, "tests") for p in (ROOT / pkg).rglob("*.py")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_one_import_path_per_module(path):
    """Our modules are imported as scarlet_deploy.<package>..., never by their folder name alone."""
    bare = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
        bare += [n for n in names if n.split(".")[0] in PACKAGES]
    assert not bare, f"{path.relative_to(ROOT)} imports {bare}; use scarlet_deploy.<...>"


def test_installed_under_one_namespace():
    import scarlet_deploy.runtime.cli as cli

    assert Path(cli.__file__).resolve() == ROOT / "runtime" / "cli.py"


@pytest.mark.slow
def test_the_wheel_installs_one_namespace(tmp_path):
    """What `pip wheel .` ships: everything under scarlet_deploy/, no generic top-level names."""
    import shutil
    import subprocess
    import sys
    import zipfile

    # Built from a copy of the tracked files: setuptools writes build/ and *.egg-info/ into the source tree.
    src = tmp_path / "src"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, check=True, capture_output=True, text=True).stdout.split()
    for f in tracked:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
                    str(src)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("scarlet_deploy-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {NS}, top
    assert f"{NS}/runtime/cli.py" in names and f"{NS}/export/scarlet.py" in names and f"{NS}/calib/qdq.py" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "scarlet = scarlet_deploy.runtime.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
