"""mtlkit's built-in plugins, importable only as ``mtlkit.plugins``.

The source folder is ``plugins/`` at the repository root, mapped to ``mtlkit.plugins`` by
setuptools' package-dir. Imported as a top-level ``plugins`` (for example with the
repository root on ``sys.path``) its modules would be loaded twice under two names and
register every component twice, so that is refused.
"""

if __name__ != "mtlkit.plugins":
    raise ImportError(
        f"the built-in plugins must be imported as 'mtlkit.plugins', not '{__name__}' "
        "(install mtlkit, e.g. pip install -e .)"
    )
