"""Every command the README and the config docstrings show is parsed against what it names: a
`blip2-jax` command's subcommand, each flag against the flags that subcommand reads (absl flags are
global, so `eval --output` parses but is ignored: `--output` is `data build`'s) and its value against
the flag's parser, `--config` files and presets by loading them, `--config.x=y` against the loaded
config's fields and types; `python benchmarks/*.py` flags against the script's argparse options;
`pip install ".[extra]"` against setup.py's extras. They need data, weights or pods that are not
here, so they are parsed, not run; `blip2-jax demo` and the tiny presets run in their own tests."""
from __future__ import annotations

import ast
import importlib.util
import re
import shlex
import types
from pathlib import Path

import pytest
from absl import flags

from blip2_jax import cli

ROOT = Path(__file__).resolve().parent.parent
# The function each subcommand runs (cli.main's table).
COMMANDS = {("demo",): cli.demo, ("train",): cli.train, ("generate",): cli.generate, ("data", "build"): cli.data_build,
            ("plan",): cli.plan, ("eval",): cli.evaluate,
            **{("convert", d): cli.convert for d in ("from-hf", "to-hf", "from-lavis", "to-lavis")}}


def _logical_lines(text: str) -> list[str]:
    return re.sub(r"\\\n\s*", " ", text).splitlines()


def documented() -> list[tuple[str, str]]:
    """(where, command line) for every command in README.md's bash blocks and inline code, and in the
    docstrings of configs/**/*.py."""
    found = []
    readme = (ROOT / "README.md").read_text()
    for block in re.findall(r"^```bash\n(.*?)^```", readme, re.S | re.M):
        found += [("README.md", line) for line in _logical_lines(block) if line.strip() and
                  not line.lstrip().startswith("#")]
    found += [("README.md", span) for span in re.findall(r"`((?:blip2-jax|python benchmarks/)[^`]*)`", readme)]
    for file in sorted((ROOT / "configs").rglob("*.py")):
        doc = ast.get_docstring(ast.parse(file.read_text())) or ""
        found += [(str(file.relative_to(ROOT)), line) for line in _logical_lines(doc)
                  if re.match(r"\s*(blip2-jax|python) ", line)]
    return found


def _commands(line: str) -> list[list[str]]:
    """The simple commands of a shell line (split at && ; | &), without `VAR=value` prefixes and
    with the synopsis brackets of optional parts removed."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if set(token) <= set("&;|"):
            commands.append(current)
            current = []
        else:
            token = token[1:] if token.startswith("[") else token  # "[--batch", "1520]": optional parts
            current.append(token[:-1] if token.endswith("]") and "[" not in token else token)
    commands.append(current)
    return [c[next(i for i, t in enumerate(c) if not re.match(r"\w+=", t)):] for c in commands if c]


def _flags_read(function: types.FunctionType) -> set[str]:
    """The names of the absl flags `function` (and the cli functions it calls) reads."""
    names, seen, todo = set(), set(), [function.__code__]
    while todo:
        code = todo.pop()
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                todo.append(const)
        for name in code.co_names:
            value = getattr(cli, name, None)
            holders = value.values() if isinstance(value, dict) else [value]
            names |= {h.name for h in holders if isinstance(h, flags.FlagHolder)}
            if isinstance(value, types.FunctionType) and value.__module__ == cli.__name__ and name not in seen:
                seen.add(name)
                todo.append(value.__code__)
    return names


def _load_config(value: str):
    """What ml_collections makes of `--config FILE[:ARG]`: FILE's get_config(ARG), or get_config()."""
    file, colon, arg = value.partition(":")
    assert (ROOT / file).is_file(), f"--config {file} does not exist"
    spec = importlib.util.spec_from_file_location(Path(file).stem, ROOT / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if colon else module.get_config()


def _config_field_type(config, path: str) -> type:
    node = config
    for part in path.split("."):
        if not hasattr(node, "keys") or part not in node:
            raise KeyError(f"no field {path!r} (at {part!r})")
        node = node[part]
    return type(node)


def check_blip2_jax(argv: list[str]) -> None:
    words = tuple(t for t in argv[1:3] if not t.startswith("-"))
    command = next((c for c in COMMANDS if words[:len(c)] == c), None)
    if command is None:
        if list(words) == argv[1:] and any(c[:len(words)] == words for c in COMMANDS):
            return  # prose naming a command group, e.g. `blip2-jax convert`
        raise AssertionError(f"no subcommand {' '.join(words)!r}; blip2-jax has {sorted(COMMANDS)}")
    allowed = _flags_read(COMMANDS[command])
    config, args = None, argv[1 + len(command):]
    i = 0
    while i < len(args):
        token = args[i]
        assert token.startswith("--"), f"stray argument {token!r}"
        name, equals, value = token[2:].partition("=")
        if not equals:
            assert i + 1 < len(args), f"--{name} has no value"
            value, i = args[i + 1], i + 1
        i += 1
        if name.startswith("config."):
            assert config is not None, f"--{name} before --config"
            field_type = _config_field_type(config, name[len("config."):])
            if field_type in (int, float, bool):
                assert value.lower() in ("true", "false") if field_type is bool else field_type(value) is not None
            continue
        assert name in allowed, f"blip2-jax {' '.join(command)} takes no --{name}; it reads {sorted(allowed)}"
        flags.FLAGS[name].parser.parse(value)  # enum choices, integers, ...
        if name == "config":
            config = _load_config(value)


def check_python(argv: list[str]) -> None:
    if argv[1] in ("-c", "-m"):
        return
    script = ROOT / argv[1]
    assert script.is_file(), f"{argv[1]} does not exist"
    tree = ast.parse(script.read_text())
    # a script's options, and those of the sibling modules it imports (a shared parser)
    siblings = [script.parent / f"{node.module}.py" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and node.module and (script.parent / f"{node.module}.py").is_file()]
    options = {node.args[0].value for t in [tree, *(ast.parse(f.read_text()) for f in siblings)]
               for node in ast.walk(t) if isinstance(node, ast.Call)
               and getattr(node.func, "attr", "") == "add_argument" and isinstance(node.args[0], ast.Constant)}
    for token in argv[2:]:
        if token.startswith("--"):
            assert token.split("=")[0] in options, f"{argv[1]} takes no {token}; it takes {sorted(options)}"


def check_pip(argv: list[str]) -> None:
    tree = ast.parse((ROOT / "setup.py").read_text())
    extras = next(k.value for k in ast.walk(tree) if isinstance(k, ast.keyword) and k.arg == "extras_require")
    names = {key.value for key in extras.keys}
    for token in argv:
        for extra in re.findall(r"\.\[([\w,-]+)\]", token):
            assert set(extra.split(",")) <= names, f"setup.py has no extra {extra!r}; it has {sorted(names)}"


CHECKS = {"blip2-jax": check_blip2_jax, "python": check_python, "pip": check_pip}


def test_documented_commands_are_found():
    found = documented()
    assert len(found) > 30
    assert {where for where, _ in found} >= {"README.md", "configs/eval/caption.py", "configs/stage1.py"}


@pytest.mark.parametrize("where,line", documented(), ids=lambda x: x if len(x) < 60 else x[:60])
def test_documented_command_names_real_flags(where, line):
    for argv in _commands(line):
        if argv[0] in CHECKS:
            CHECKS[argv[0]](argv)


@pytest.mark.parametrize("line,error", [
    ("blip2-jax eval --config configs/eval/caption.py:coco_opt2.7b --output /tmp/eval", "eval takes no --output"),
    ("blip2-jax train --config configs/stage1.py:tiny --config.data.sorce=json", "no field 'data.sorce'"),
    ("blip2-jax train --config configs/stage1.py:tiny --config.batch_size=many", "invalid literal"),
    ("blip2-jax plan --config configs/stage1.py:tiny --device_kind tpu", "value should be one of"),
    ("blip2-jax data build --annotations a.json --image-root /x", "takes no --image-root"),
    ("blip2-jax convert to-hf --checkpoint x --out y extra", "stray argument 'extra'"),
    ("blip2-jax trian --config configs/stage1.py:tiny", "no subcommand 'trian'"),
    ("python benchmarks/generate.py --new_tokens 5", "takes no --new_tokens"),
    ('pip install -e ".[tensorflow]"', "no extra 'tensorflow'"),
])
def test_a_wrong_documented_command_is_caught(line, error):
    with pytest.raises((AssertionError, ValueError, KeyError, flags.Error), match=error):
        test_documented_command_names_real_flags("a doc", line)
