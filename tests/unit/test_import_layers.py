"""The import layers stay honest: the core never imports a higher layer, and the harness adapters
(model_wrappers/, tasks/) use the library's public names only."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LIB = ROOT / "lmms_quant"
#: the core: recipes, the architecture table, planning, quantizers, calibration, bpw, checkpoints, errors
CORE = ["recipe.py", "architectures.py", "plan.py", "apply.py", "bpw.py", "calibration.py", "calibration_data.py", "cache.py", "offload.py",
        "errors.py", "provenance.py", "models.py", "builtin_models.py", "quantizers", "checkpoints", "metrics"]
HIGHER = ("lmms_quant.model_wrappers", "lmms_quant.tasks", "lmms_quant.analysis", "lmms_quant.zoo", "lmms_quant.lm_tasks",
          "lmms_quant.cli")


def modules(entry: str) -> list[Path]:
    path = LIB / entry
    return sorted(path.rglob("*.py")) if path.is_dir() else [path]


def imported(path: Path, package: str) -> list[tuple[str, list[str]]]:
    """(absolute module name, imported names) of every import in ``path`` (relative imports resolved)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            name = node.module or ""
            if node.level:
                name = ".".join(base[: len(base) - node.level + 1] + ([name] if name else []))
            out.append((name, [a.name for a in node.names]))
    return out


def package_of(path: Path, root: Path, pkg: str) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = [pkg, *rel.parts]
    return ".".join(parts if path.name == "__init__.py" else parts[:-1])


@pytest.mark.parametrize("entry", CORE)
def test_the_core_imports_no_higher_layer(entry):
    for path in modules(entry):
        for name, _ in imported(path, package_of(path, LIB, "lmms_quant")):
            assert not name.startswith(HIGHER), f"{path.relative_to(ROOT)} imports {name} (a higher layer)"


@pytest.mark.parametrize("folder", ["model_wrappers", "tasks"])
def test_adapters_use_only_public_names_of_the_library(folder):
    """model_wrappers/ and tasks/ (the two adapter layers, which may share each other's helpers) reach the
    library through its public names only."""
    root = ROOT / folder
    pkg = f"lmms_quant.{folder}"
    for path in sorted(root.rglob("*.py")):
        for name, names in imported(path, package_of(path, root, pkg)):
            if name.startswith("lmms_quant") and not name.startswith(("lmms_quant.model_wrappers", "lmms_quant.tasks")):
                private = [n for n in names if n.startswith("_")] + ([name] if any(p.startswith("_") for p in name.split(".")) else [])
                assert not private, f"{path.relative_to(ROOT)} imports private {private} from {name}"


def test_the_layer_check_sees_a_violation(tmp_path):
    bad = tmp_path / "plan.py"
    bad.write_text("from .analysis.report import x\nfrom lmms_quant.model_wrappers import quant_vlm\n")
    names = [n for n, _ in imported(bad, "lmms_quant")]
    assert names == ["lmms_quant.analysis.report", "lmms_quant.model_wrappers"]


@pytest.mark.parametrize("folder", ["lmms_quant", "model_wrappers", "tasks"])
def test_the_installed_package_never_imports_the_developer_tools(folder):
    """tools/ (the zoo's trainers) is not installed: nothing that is may import it."""
    root = ROOT / folder
    pkg = "lmms_quant" if folder == "lmms_quant" else f"lmms_quant.{folder}"
    for path in sorted(root.rglob("*.py")):
        for name, _ in imported(path, package_of(path, root, pkg)):
            assert name != "tools" and not name.startswith("tools."), f"{path.relative_to(ROOT)} imports {name} (tools/ is not installed)"
