"""Package layout rules that break things far from where they are made."""

from __future__ import annotations

import sys

from helpers import REPO

PACKAGE = REPO / "platform" / "litlab"


def test_no_module_shadows_the_standard_library():
    """Under DDP Lightning relaunches `litlab/__main__.py` as a script, which puts platform/litlab/
    itself on sys.path: a litlab/secrets.py (say) would then be imported as the stdlib `secrets`."""
    names = {p.stem for p in PACKAGE.glob("*.py")} | {p.name for p in PACKAGE.iterdir() if p.is_dir()}
    assert not names & set(sys.stdlib_module_names), names & set(sys.stdlib_module_names)


def test_platform_is_not_a_package():
    assert not (REPO / "platform" / "__init__.py").exists()  # it would shadow the stdlib `platform`
