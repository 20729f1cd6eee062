"""Load the project's command-line scripts (``train.py``, ``bench/*.py`` ...) as modules."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script(relative_path: str):
    """The module of ``ROOT/relative_path``, executed once per call (a fresh module)."""
    path = ROOT / relative_path
    name = "script_" + relative_path.replace("/", "_").removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def load_cli(name: str):
    """``train``, ``evaluate`` or ``export`` at the top of the repository."""
    return load_script(f"{name}.py")


def one_error_line(capsys, *expected):
    """The single ``error:`` line of stderr (no traceback); it holds every ``expected``
    text."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]
