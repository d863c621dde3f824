"""The ``mtlkit`` command line, a thin caller of the Python API.

``main`` (:mod:`.main`) collects the sub-commands (:mod:`.commands`): the built-in ones of
:mod:`.run`, :mod:`.listing`, :mod:`.compare`, :mod:`.sweep`, :mod:`.plot` and :mod:`.doctor`, then those
plugins add through the ``register_commands`` hook. Imports go one way: ``main`` ->
``commands`` -> the command modules -> the rest of mtlkit; nothing outside this package
imports it except ``mtlkit.__main__``.
"""

from .main import main

__all__ = ["main"]
