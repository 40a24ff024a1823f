"""Bytecode for kvmc's modules before a benchmark times kvmc processes.

pip compiles an installed package's modules when it installs them; a checkout's are compiled
at first import, unless PYTHONDONTWRITEBYTECODE is set (as on these machines), and then every
module edited since its .pyc was written is compiled again in every kvmc process (~12 ms for
kvmc/cli.py alone): a cost no installed kvmc pays, which would blur start-up figures.
"""

from __future__ import annotations

import compileall
from pathlib import Path


def compile_kvmc() -> None:
    """Write fresh .pyc files for kvmc's modules (py_compile writes them whatever
    PYTHONDONTWRITEBYTECODE says)."""
    import kvmc

    compileall.compile_dir(str(Path(kvmc.__file__).parent), quiet=1)
