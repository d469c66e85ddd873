"""lpjax itself never imports torch (only the parity tests use it, as a reference)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_lpjax_and_convert_never_import_torch():
    offenders = []
    for path in [*(ROOT / "lpjax").rglob("*.py"), *(ROOT / "convert").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] == "torch"]
    assert offenders == []
