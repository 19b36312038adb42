"""A sandbox for untrusted Python code: a confined process per run (see ``docs/sandbox.md``).

:func:`run_python` runs a program and returns a :class:`SandboxResult` whose ``cause`` says how it ended;
:func:`probe` lists the confinement layers this machine provides. ``python -m alignflow.sandbox`` prints them.
This package imports nothing from the trainers.
"""

from alignflow.sandbox.runner import CAUSES, SandboxLimits, SandboxResult, probe, run_python

__all__ = ["CAUSES", "SandboxLimits", "SandboxResult", "probe", "run_python"]
