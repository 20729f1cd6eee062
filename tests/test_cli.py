"""Every console script of pyproject.toml is a ``main`` under aldk_tf/cli/ whose --help
works, and the docs' ``python -m aldk_tf.cli.<tool>`` spellings run."""

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


DOCS = "".join(path.read_text() for path in [ROOT / "README.md",
                                             *(ROOT / "docs").glob("*.md")])


@pytest.mark.parametrize("cli, old", [("warp", "aldk_tf.deploy.warp"),
                                      ("demo", "aldk_tf.demo"),
                                      ("report", "aldk_tf.report")])
def test_the_python_m_spellings_of_the_docs_run_the_cli(cli, old):
    """Only aldk_tf/cli/ holds mains: the docs write ``python -m aldk_tf.cli.<tool>``,
    never the library modules' names of earlier versions."""
    assert f"python -m aldk_tf.cli.{cli}" in DOCS
    assert f"python -m {old} " not in DOCS and f"python -m {old}`" not in DOCS
    result = subprocess.run([sys.executable, "-m", f"aldk_tf.cli.{cli}", "--help"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.startswith("usage:"), result.stderr


def test_the_warp_module_says_where_its_command_went():
    result = subprocess.run([sys.executable, "-m", "aldk_tf.deploy.warp", "--help"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1 and "python -m aldk_tf.cli.warp" in result.stderr
