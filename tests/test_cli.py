"""Every console script of pyproject.toml is a ``main`` under aldk_tf/cli/ whose --help
works, and the ``python -m`` spellings of the docs for the tools that moved still run."""

import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_console_script_is_a_cli_main_with_help(script, capsys):
    module, function = SCRIPTS[script].split(":")
    assert module.startswith("aldk_tf.cli.")
    main = getattr(importlib.import_module(module), function)
    with pytest.raises(SystemExit) as exit_status:
        main(["--help"])
    assert exit_status.value.code == 0
    assert capsys.readouterr().out.startswith("usage:")


@pytest.mark.parametrize("module, cli", [("aldk_tf.deploy.warp", "warp"),
                                         ("aldk_tf.demo", "demo"),
                                         ("aldk_tf.report", "report")])
def test_the_python_m_spellings_of_the_docs_run_the_cli(module, cli):
    assert f"python -m {module}" in "".join(
        path.read_text() for path in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
    old, new = (subprocess.run([sys.executable, "-m", name, "--help"], capture_output=True,
                               text=True, cwd=ROOT) for name in (module, f"aldk_tf.cli.{cli}"))
    assert old.returncode == 0, old.stderr
    assert old.stdout.startswith("usage:") and old.stdout == new.stdout
