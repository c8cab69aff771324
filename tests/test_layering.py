"""The package's layering, read from every module's imports (function-level ones included): the
data pipeline knows nothing of models or objectives; only the loading layer (`weights/`), the
conversion commands (`convert/`) and the trainer's Checkpointer touch checkpoint formats; and
`convert/` is commands, which only the CLI (and the demo's chain) runs."""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "blip2_jax"


def imports(path: pathlib.Path) -> set[str]:
    """Every module `path` imports, absolute ('from . import x' resolved against its package)."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module) if p)
            found |= {module} | {f"{module}.{a.name}" for a in node.names}
    return found


def modules(under: str = "") -> dict[str, set[str]]:
    return {str(p.relative_to(PACKAGE)): imports(p) for p in sorted((PACKAGE / under).rglob("*.py"))}


def test_the_import_reader_sees_what_it_must():
    found = modules()
    assert "blip2_jax.models.blip2" in found["train/layout.py"]
    assert "orbax.checkpoint" in found["checkpoint.py"]


@pytest.mark.parametrize("module", sorted(modules("data")))
def test_the_data_pipeline_imports_neither_models_nor_objectives(module):
    """The batch it builds is described by plain values (`train.layout.data_args`)."""
    bad = sorted(m for m in modules("data")[module] if m.startswith(("blip2_jax.models", "blip2_jax.objectives")))
    assert not bad, f"data/{module} imports {bad}"


def test_only_the_loading_code_and_the_checkpointer_read_checkpoint_formats():
    """(torch is no format: the demo runs `transformers` on its export, through from_pretrained.)"""
    formats = ("orbax", "safetensors")
    allowed = ("weights/", "convert/", "checkpoint.py")
    offenders = {m: sorted(i for i in found if i.split(".")[0] in formats)
                 for m, found in modules().items() if not m.startswith(allowed)}
    assert not {m: v for m, v in offenders.items() if v}


def test_convert_holds_commands_that_only_the_cli_runs():
    """Training, evaluation and generation load weights through `weights/`, not through the
    conversion commands (the demo runs `to-hf` as one step of its chain, as a user would)."""
    users = {m: sorted(i for i in found if i.startswith("blip2_jax.convert"))
             for m, found in modules().items() if not m.startswith(("cli/", "convert/", "demo/"))}
    assert not {m: v for m, v in users.items() if v}
