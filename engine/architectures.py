"""The names of the registered architectures, read without importing the models (which import torch): for a
front end running where torch is not, QGIS's own Python. Each name is the first argument of a
``@register("name", ...)`` decorator in ``engine/models``; the registry itself is ``engine.models``, and a test
keeps the two lists equal. Standard library only.
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path

MODELS = Path(__file__).resolve().parent / "models"


@functools.lru_cache(maxsize=None)
def architecture_names() -> tuple[str, ...]:
    """The registered architectures' names, sorted as ``engine.models.list_models`` sorts them."""
    names = []
    for path in sorted(MODELS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "register"
                    and node.args and isinstance(node.args[0], ast.Constant)):
                names.append(node.args[0].value)
    return tuple(sorted(names))
