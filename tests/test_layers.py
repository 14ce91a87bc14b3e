"""The import rule of the layout: each layer imports only the layers below it.

Ranks, bottom to top: `kernels` and `data_prep` (0: nothing of ours, not even each other), `rwkv5` (1),
`flows` (2), `rwkv5_app` (3). Every import statement counts, those inside functions included.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RANKS = {"kernels": 0, "data_prep": 0, "rwkv5": 1, "flows": 2, "rwkv5_app": 3}


def _imported_modules(node: ast.AST, package: str) -> list[str]:
    """Dotted names an `import` or `from ... import` statement in `package` (dotted) refers to."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:  # relative: resolve against the importing module's package
        base = package.split(".")[: len(package.split(".")) - node.level + 1]
        return [".".join(base + ([node.module] if node.module else []))]
    return [node.module]


def _allowed(importer: str, imported: str) -> bool:
    if imported == importer:
        return True
    if RANKS[importer] == 0:
        return False  # the bottom layers import nothing of ours
    return RANKS[imported] < RANKS[importer]


def layer_violations(root: Path) -> list[str]:
    """`file:line: import` for each import under `root` of a top-level package of the same or a higher layer."""
    found = []
    for top in sorted(RANKS):
        for path in sorted((root / top).rglob("*.py")):
            rel = path.relative_to(root)
            package = ".".join(rel.with_suffix("").parts[:-1])
            for node in ast.walk(ast.parse(path.read_text(), filename=str(rel))):
                if not isinstance(node, (ast.Import, ast.ImportFrom)):
                    continue
                for name in _imported_modules(node, package):
                    imported = name.split(".")[0]
                    if imported in RANKS and not _allowed(top, imported):
                        found.append(f"{rel}:{node.lineno}: {ast.unparse(node)} "
                                     f"({top}, rank {RANKS[top]}, imports {imported}, rank {RANKS[imported]})")
    return found


def test_no_layer_imports_a_higher_one():
    found = layer_violations(REPO)
    assert not found, "a layer imports one at or above it:\n" + "\n".join(found)


def test_a_planted_violation_is_reported(tmp_path):
    def plant(rel: str, text: str) -> None:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    plant("kernels/ok.py", "import torch\nfrom kernels.wkv5 import x\nfrom . import y\n")
    plant("data_prep/bad.py", "import json\n\n\ndef f():\n    from kernels import wkv5\n")
    plant("rwkv5/train/bad.py", "from data_prep import shards\n\n\ndef g():\n    import flows.milestone\n")
    plant("rwkv5/eval/rel.py", "from ...flows import x\n")
    plant("flows/ok.py", "from rwkv5.train import launch\nimport data_prep, kernels\n")
    plant("rwkv5_app/ok.py", "import flows, rwkv5, data_prep, kernels\n")

    assert layer_violations(tmp_path) == [
        "data_prep/bad.py:5: from kernels import wkv5 (data_prep, rank 0, imports kernels, rank 0)",
        "rwkv5/eval/rel.py:1: from ...flows import x (rwkv5, rank 1, imports flows, rank 2)",
        "rwkv5/train/bad.py:5: import flows.milestone (rwkv5, rank 1, imports flows, rank 2)",
    ]
