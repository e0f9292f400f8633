"""The package's layers import one way only (DESIGN.md section 4, issue 12).

Layers, lowest first: 0 ``gridclip.config`` / ``gridclip.utils``; 1 ``gridclip.clip``;
2 ``gridclip.data`` and ``gridclip.evaluation``; 3 ``gridclip.modeling``; 4 ``gridclip.engine``;
5 ``gridclip_tools`` (tool-side modules, when present). A module may import its own layer or a
lower one, at the top of the file; a function-local import of the project's own code is a dodged
import cycle and fails too (lazy imports of optional third-party packages are fine). The
package's ``__init__`` (which imports what registers) is above every layer.
"""

import ast
import os
from typing import Iterator, List, Optional, Tuple

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT = os.path.join(REPO, "projects", "GridCLIP")

LAYERS = {
    "gridclip.config": 0,
    "gridclip.utils": 0,
    "gridclip.clip": 1,
    "gridclip.data": 2,
    "gridclip.evaluation": 2,
    "gridclip.modeling": 3,
    "gridclip.engine": 4,
    "gridclip_tools": 5,
}
TOP = 99  # a module in no layer (test_layer_table_covers_every_subpackage fails on it)
#: ``gridclip`` itself: its __init__ registers the datasets and models (imports up to modeling),
#: so importing the package root is a modeling-level import.
ROOT_LAYER = LAYERS["gridclip.modeling"]
OWN_PACKAGES = ("gridclip", "gridclip_tools")


def layer_of(module: str) -> Optional[int]:
    """Layer of a dotted module name of the project; None for third-party modules."""
    if module.split(".")[0] not in OWN_PACKAGES:
        return None
    if module == "gridclip":
        return ROOT_LAYER
    for prefix, layer in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return TOP


def project_modules() -> Iterator[Tuple[str, str]]:
    """(path, dotted module name) of every module of the package and gridclip_tools."""
    for package in OWN_PACKAGES:
        root = os.path.join(PROJECT, package)
        for folder, _, files in os.walk(root):
            for name in sorted(files):
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    rel = os.path.relpath(path, PROJECT)[: -len(".py")].split(os.sep)
                    if rel[-1] == "__init__":
                        rel = rel[:-1] + ["__init__"]
                    yield path, ".".join(rel)


def imported_modules(node: ast.AST, module: str) -> List[str]:
    """The absolute module names an import statement inside ``module`` refers to."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    package = module.rsplit(".", 1)[0]  # for foo/__init__ the package is foo
    if node.level == 0:
        return [node.module]
    parts = package.split(".")
    base = parts[: len(parts) - (node.level - 1)]
    if node.module:
        return [".".join(base + [node.module])]
    return [".".join(base + [alias.name]) for alias in node.names]


def violations(path: str, module: str) -> List[str]:
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    own = module[: -len(".__init__")] if module.endswith(".__init__") else module
    my_layer = layer_of(own)
    rel = os.path.relpath(path, REPO)
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            local = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for target in imported_modules(child, module):
                    layer = layer_of(target)
                    if layer is None:
                        continue
                    where = f"{rel}:{child.lineno}"
                    if in_function:
                        found.append(
                            f"{where}: function-local import of {target} (layer {layer}) in "
                            f"{own} (layer {my_layer}): import it at the top of the file"
                        )
                    elif layer > my_layer:
                        found.append(
                            f"{where}: {own} (layer {my_layer}) imports {target} (layer "
                            f"{layer}), a higher layer"
                        )
            visit(child, local)

    visit(tree, False)
    return found


def test_layer_table_covers_every_subpackage():
    for _, module in project_modules():
        if module != "gridclip.__init__":
            assert (
                layer_of(module) != TOP
            ), f"{module} is in no layer of {sorted(LAYERS)}: add it (or its folder) to LAYERS"


def test_checker_finds_upward_and_function_local_imports(tmp_path):
    source = tmp_path / "text.py"
    source.write_text(
        "import torch\n"
        "from ..modeling import vocabulary\n"
        "def f():\n"
        "    import numpy\n"
        "    from .loading import clip_model_key\n"
    )
    found = violations(str(source), "gridclip.clip.text")
    assert len(found) == 2, found
    assert "gridclip.clip.text (layer 1) imports gridclip.modeling (layer 3)" in found[0]
    assert ":5: function-local import of gridclip.clip.loading" in found[1]


def test_imports_go_one_way_and_sit_at_the_top():
    found = [v for path, module in project_modules() for v in violations(path, module)]
    if found:
        pytest.fail(f"{len(found)} layering violations:\n" + "\n".join(found))
