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


def test_the_declared_api_exists_and_the_nodes_use_no_private_core_name():
    """oft_core/__init__.py declares, by module, the names the nodes, the CLI and the benchmarks use: each exists,
    and no node module or benchmark imports an underscored name from the core."""
    import ast
    import importlib
    import re

    import oft_core

    declared = re.findall(r"`(\w+)` — ((?:`\w+`(?:, | / |,?\s+)?)+)", oft_core.__doc__.replace("\n  ", " "))
    assert len(declared) >= 15
    for module, names in declared:
        mod = importlib.import_module(f"oft_core.{module}")
        for name in re.findall(r"`(\w+)`", names):
            assert hasattr(mod, name), f"oft_core.{module}.{name} is declared but does not exist"
    root = Path(__file__).resolve().parents[1]
    for path in [*(root / "nodes").glob("*.py"), *(root / "benchmarks").glob("*.py"), root / "oft_core" / "cli.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            if "oft_core" in (node.module or "") or (path.name == "cli.py" and node.level > 0):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name} imports private core names {private} from {node.module}"
