"""Every tensor the package creates lives where its inputs live: a source scan of torch's factory functions.

A factory call without `device=` (`torch.zeros(n)`, `torch.arange(b)`, `torch.tensor(x)`, ...) makes a CPU
tensor; on a GPU worker the first op that mixes it with a CUDA tensor fails (the TopK backward of issue 16 did
exactly that). The fake-CUDA tests in `test_sae_device.py` prove the training step end to end; this scan covers
the rest of the package, which no test can run on a GPU here: every such call passes `device=`, or its line
says `# host:` and why the tensor belongs in host memory (built before a module is moved, data read from disk,
numbers for a report).
"""

from __future__ import annotations

import ast
from pathlib import Path

import prisma_ray

FACTORIES = {
    "arange",
    "as_tensor",
    "empty",
    "eye",
    "full",
    "linspace",
    "logspace",
    "ones",
    "rand",
    "randint",
    "randn",
    "randperm",
    "tensor",
    "zeros",
}
PACKAGE = Path(prisma_ray.__file__).parent


def factory_calls_without_device(source: str) -> list[tuple[int, str]]:
    """`(line, "torch.<name>")` of every `torch.<factory>(...)` call in `source` that passes neither `device=`
    nor `**kwargs` (which may carry it) and carries no `# host:` comment on any of its lines."""
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        func = node.func
        if not (isinstance(func.value, ast.Name) and func.value.id == "torch" and func.attr in FACTORIES):
            continue
        if any(k.arg in ("device", None) for k in node.keywords):  # device=..., or **kwargs that may carry it
            continue
        if any("# host:" in line for line in lines[node.lineno - 1 : node.end_lineno]):
            continue
        found.append((node.lineno, f"torch.{func.attr}"))
    return found


def test_the_scan_finds_what_it_should():
    src = (
        "import torch\n"
        "a = torch.zeros(3)\n"
        "b = torch.arange(4, device=x.device)\n"
        "c = torch.tensor([1.0])  # host: a report value\n"
        "d = torch.full(\n    (2,),\n    1.0,\n)\n"
        "e = torch.zeros_like(x)\n"
    )
    assert factory_calls_without_device(src) == [(2, "torch.zeros"), (5, "torch.full")]


def test_every_factory_in_the_package_says_its_device():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for line, name in factory_calls_without_device(path.read_text()):
            offenders.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {name}(...) without device=")
    assert not offenders, (
        "tensor factories that would create CPU tensors on a GPU worker (pass device=, or mark the line "
        "`# host: <why>`):\n" + "\n".join(offenders)
    )
