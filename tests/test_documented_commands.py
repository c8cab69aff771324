"""Every command the README and the config docstrings show is parsed as `blip2-jax` parses it
(`cli.parse`: its subcommand, its own flags and their values, `--config` files and presets loaded,
`--config.x=y` applied to the loaded config); `python benchmarks/*.py` flags against the script's
argparse options; `pip install ".[extra]"` against setup.py's extras. They need data, weights or
pods that are not here, so they are parsed, not run; `blip2-jax demo` and the tiny presets run in
their own tests. Each command's `--help` lists exactly the flags it parses."""
from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest
from absl import app

from blip2_jax import cli
from blip2_jax.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


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


def check_blip2_jax(argv: list[str]) -> None:
    words = tuple(t for t in argv[1:3] if not t.startswith("-"))
    if list(words) == argv[1:] and any(c[:len(words)] == words for c in cli.COMMANDS):
        return  # prose naming a command or a group, e.g. `blip2-jax convert`
    if any(a in cli.HELP for a in argv):
        cli.find_command(argv[1:])
        return
    cli.parse(argv)


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
def test_documented_command_names_real_flags(where, line, monkeypatch):
    monkeypatch.chdir(ROOT)  # the commands name configs/... relative to the checkout
    for argv in _commands(line):
        if argv[0] in CHECKS:
            CHECKS[argv[0]](argv)


@pytest.mark.parametrize("line,error", [
    ("blip2-jax eval --config configs/eval/caption.py:coco_opt2.7b --output /tmp/eval",
     "eval: Unknown command line flag 'output'"),
    ("blip2-jax generate --config configs/eval/caption.py:coco_opt2.7b",
     "generate: Unknown command line flag 'config'"),
    ("blip2-jax train --config configs/stage1.py:tiny --config.data.sorce=json", "no field 'data.sorce'"),
    ("blip2-jax train --config configs/stage1.py:tiny --config.batch_size=many", "invalid literal"),
    ("blip2-jax plan --config configs/stage1.py:tiny --device_kind tpu", "value should be one of"),
    ("blip2-jax data build --annotations a.json --image-root /x", "Unknown command line flag 'image-root'"),
    ("blip2-jax convert to-hf --src x --out y extra", "stray argument 'extra'"),
    ("blip2-jax convert to-hf --checkpoint x --out y", "to-hf: Unknown command line flag 'checkpoint'"),
    ("blip2-jax trian --config configs/stage1.py:tiny", "unknown command 'trian'"),
    ("python benchmarks/generate.py --new_tokens 5", "takes no --new_tokens"),
    ('pip install -e ".[tensorflow]"', "no extra 'tensorflow'"),
])
def test_a_wrong_documented_command_is_caught(line, error, monkeypatch):
    with pytest.raises((AssertionError, UserError, app.UsageError), match=error):
        test_documented_command_names_real_flags("a doc", line, monkeypatch)


@pytest.mark.parametrize("words", sorted(cli.COMMANDS), ids=" ".join)
def test_each_commands_help_lists_its_own_flags(words, capsys):
    """`blip2-jax COMMAND --help` names every flag the command parses and no other (a flag of
    another command, e.g. generate's --image under train, is an unknown flag there)."""
    cli.main(["blip2-jax", *words, "--help"])
    listed = set(re.findall(r"^  --(\w+):", capsys.readouterr().out, re.M))
    assert listed == set(cli.COMMANDS[words].flag_values([]))
    others = set().union(*(c.flag_values([]) for c in cli.COMMANDS.values())) - listed
    for name in others:
        with pytest.raises(UserError, match=f"Unknown command line flag '{name}'"):
            cli.parse(["blip2-jax", *words, f"--{name}=1"])
