"""pyproject.toml is valid for pip and the Comfy registry; torch stays ComfyUI's to provide."""

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_for_pip_and_registry():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = data["project"]
    assert project["name"] == "comfyui-oft" and re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert (ROOT / project["license"]["file"]).exists() and (ROOT / project["readme"]).exists()
    pep508 = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[a-z,]+\])?\s*((==|>=|<=|~=|<|>|!=)[0-9][0-9.*]*,?\s*)*$")
    for dep in project["dependencies"]:
        assert pep508.match(dep), dep  # real requirement strings, no comments
        assert not dep.lower().startswith(("torch", "torchvision", "torchaudio", "spandrel")), dep
    comfy = data["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"]
    assert data["tool"]["setuptools"]["packages"] == ["oft_core", "oft_core.formats"]
    assert all(url.startswith("https://") for url in project["urls"].values())


def test_no_tests_package_and_no_print_in_library_code():
    assert not (ROOT / "tests" / "__init__.py").exists()
    offenders = [f"{p.relative_to(ROOT)}:{i}" for d in ("oft_core", "nodes") for p in (ROOT / d).rglob("*.py")
                 if p.name != "cli.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if re.match(r"\s*print\(", line)]
    assert offenders == []


def test_oft_core_never_imports_comfy():
    pattern = re.compile(r"^\s*(import|from)\s+(comfy|comfy_api|comfy_extras|folder_paths|nodes|server)\b", re.M)
    hits = [str(p.relative_to(ROOT)) for p in (ROOT / "oft_core").rglob("*.py") if pattern.search(p.read_text())]
    assert hits == []


def _declared(doc: str) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """oft_core/__init__.py's declarations: {module: names} used by the nodes / CLI / benchmarks, and {module: names}
    public beyond those uses (the paragraph "Public beyond those uses:"). A declaration reads
    "`mod`[, `mod2`] — `name`, `name2`"; modules are relative to oft_core."""
    used_part, _, kept_part = doc.partition("Public beyond those uses:")
    pattern = re.compile(r"((?:`[\w.]+`(?:, )?)+) — ((?:`\w+`(?:, | / )?)+)")

    def parse(text):
        out: dict[str, set[str]] = {}
        for modules, names in pattern.findall(text.replace("\n  ", " ")):
            for module in re.findall(r"`([\w.]+)`", modules):
                out.setdefault(module, set()).update(re.findall(r"`(\w+)`", names))
        return out

    return parse(used_part), parse(kept_part)


def _is_core_module(dotted: str) -> bool:
    path = ROOT.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _unpacked(module: str) -> str:
    return module[len("comfyui_oft."):] if module.startswith("comfyui_oft.oft_core") else module


def _core_uses(path: Path) -> set[tuple[str, str]]:
    """(core module, name) of every core name `path` uses: `from oft_core.m import n` (absolute or relative) and
    attribute uses `m.n` / `oft_core.m.n` through a binding of a core module; `comfyui_oft.oft_core…` (the pack's
    own copy, as a benchmark imports it) counts as `oft_core…`."""
    import ast

    tree = ast.parse(path.read_text())
    package = list(path.relative_to(ROOT).parent.parts)
    modules: dict[str, str] = {}  # local name -> core module
    uses = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            mod = _unpacked(".".join([*base, *([node.module] if node.module else [])]))
            if mod.split(".")[0] != "oft_core":
                continue
            for alias in node.names:
                if _is_core_module(f"{mod}.{alias.name}"):
                    modules[alias.asname or alias.name] = f"{mod}.{alias.name}"
                else:
                    uses.add((mod, alias.name))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                name = _unpacked(alias.name)
                if name.split(".")[0] == "oft_core" and (alias.asname or name == alias.name):
                    modules[alias.asname or "oft_core"] = name if alias.asname else "oft_core"

    def module_of(expr):
        if isinstance(expr, ast.Name):
            return modules.get(expr.id)
        if isinstance(expr, ast.Attribute):
            base = module_of(expr.value)
            if base and _is_core_module(f"{base}.{expr.attr}"):
                return f"{base}.{expr.attr}"
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            mod = module_of(node.value)
            if mod and not _is_core_module(f"{mod}.{node.attr}"):
                uses.add((mod, node.attr))
    return uses


def _users() -> list[Path]:
    return [*(ROOT / "nodes").glob("*.py"), *(ROOT / "benchmarks").glob("*.py"), ROOT / "oft_core" / "cli.py"]


def test_the_declared_api_exists_and_the_nodes_use_no_private_core_name():
    """oft_core/__init__.py declares, by module, exactly the names the nodes, the CLI and the benchmarks use (AST:
    imports, relative or absolute, and attribute uses `module.name`): each declared name exists and is used, each
    used name is declared (or in the package's `__all__` when used from the package), and none is underscored."""
    import importlib

    import oft_core

    used_decl, kept_decl = _declared(oft_core.__doc__)
    assert len(used_decl) >= 15 and kept_decl
    for module, names in [*used_decl.items(), *kept_decl.items()]:
        mod = importlib.import_module(f"oft_core.{module}")
        for name in names:
            assert not name.startswith("_"), f"oft_core.{module}.{name}: a declared name is public"
            assert hasattr(mod, name), f"oft_core.{module}.{name} is declared but does not exist"
    uses: dict[tuple[str, str], list[str]] = {}
    for path in _users():
        for use in _core_uses(path):
            uses.setdefault(use, []).append(path.name)
    undeclared = sorted(f"{mod}.{name} ({', '.join(sorted(files))})" for (mod, name), files in uses.items()
                        if (name not in oft_core.__all__ if mod == "oft_core"
                            else name not in used_decl.get(mod[len("oft_core."):], ())))
    assert undeclared == [], "used outside the core but not declared in oft_core/__init__.py"
    unused = sorted(f"{module}.{name}" for module, names in used_decl.items() for name in names
                    if (f"oft_core.{module}", name) not in uses)
    assert unused == [], "declared as used by the nodes / CLI / benchmarks, but none of them uses it"


def test_every_public_core_name_is_declared():
    """Every top-level def / class / assignment of a public oft_core module (no underscore in its path) is declared
    in oft_core/__init__.py, there or under a module that re-exports it, or is in the package's `__all__`; everything
    else starts with an underscore (a module's logger `log` aside). Tests may use underscored names where they test
    internals."""
    import ast
    import importlib

    import oft_core

    used_decl, kept_decl = _declared(oft_core.__doc__)
    public = {(name, id(getattr(oft_core, name))) for name in oft_core.__all__}
    for module, names in [*used_decl.items(), *kept_decl.items()]:
        mod = importlib.import_module(f"oft_core.{module}")
        public.update((name, id(getattr(mod, name))) for name in names)
    offenders = []
    for path in sorted((ROOT / "oft_core").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        if any(p.startswith("_") for p in parts):
            continue  # a private module (formats/_write.py, __main__.py): all of it is internal
        names = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        mod = importlib.import_module(".".join(parts))
        for name in sorted(names):
            if name.startswith("_") or name == "log":
                continue
            if (name, id(getattr(mod, name))) not in public:
                offenders.append(f"{'.'.join(parts)}.{name}")
    assert offenders == [], "public but not declared in oft_core/__init__.py (declare it or add an underscore)"
