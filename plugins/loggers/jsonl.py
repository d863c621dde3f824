"""The ``jsonl`` logger: the run's own ``log.jsonl``.

That log is written by every run, named or not: ``mtlkit compare``, ``mtlkit plot`` and
resuming read it. Registering its writer here lets recipes name it (it is the default of
``[[loggers]]``) and lists it with the other loggers; naming it writes no second copy.
"""

from __future__ import annotations

from mtlkit.engine.runfiles import JsonlLog
from mtlkit.hookspecs import hookimpl


def jsonl_logger(params) -> JsonlLog:
    """log.jsonl, one JSON record a line (always written; compare, plot and resume read it)"""
    return JsonlLog()


@hookimpl
def register_loggers(register):
    register("jsonl", jsonl_logger)
