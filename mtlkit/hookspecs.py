"""The hooks a plugin may implement. Each receives a ``register`` callback.

The seven component hooks (``register_backbones`` ... ``register_loggers``) share one
``register(name, factory, params=None, description=None, tiny=None)``, which adds one
component (the command-line hooks at the end have their own, documented there):

- ``name``: the name recipes use (unique within its kind);
- ``factory``: ``factory(params, **context)`` builds the component; ``params`` is an
  instance of ``params`` (validated), ``context`` depends on the kind (see
  :mod:`mtlkit.contracts`);
- ``params``: a pydantic model (``extra="forbid"``) of the component's parameters;
  ``None`` means the component takes none;
- ``description``: one line for ``mtlkit list``; defaults to the factory's docstring;
- ``tiny``: params of a tiny variant that runs in a CPU test (``None``: the defaults are
  small); for a component that reads files, a function ``tiny(folder) -> params`` that
  writes a tiny copy of the files' published layout into ``folder`` and returns the params
  that read it.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("mtlkit")
hookimpl = pluggy.HookimplMarker("mtlkit")


@hookspec
def register_backbones(register):
    """Register backbones: shared feature extractors that honour the feature contract
    (:class:`mtlkit.contracts.Backbone`). Factory context: ``task_names`` (list of str),
    passed only to factories whose signature accepts it (backbones with task- or
    domain-specific layers)."""


@hookspec
def register_heads(register):
    """Register task heads. Factory context: ``in_channels`` (int), ``task``
    (:class:`mtlkit.contracts.Task`, which gives ``out_channels`` and ``output_activation``)."""


@hookspec
def register_attention(register):
    """Register attention / sharing plugins: how tasks share or attend to the backbone.
    Factory context: ``backbone`` (a zero-argument callable that builds a fresh backbone),
    ``heads`` (task name -> callable(in_channels) building that task's head), ``tasks``
    (task name -> Task). Returns a :class:`mtlkit.contracts.MultiTaskNetwork`."""


@hookspec
def register_weightings(register):
    """Register loss-weighting or gradient-aggregation methods
    (:class:`mtlkit.contracts.Weighting`). Factory context: ``task_names`` (list of str)."""


@hookspec
def register_tasks(register):
    """Register tasks: a loss plus whole-split metrics (:class:`mtlkit.contracts.Task`).
    Factory context: ``name`` (the task's key in the recipe)."""


@hookspec
def register_datasets(register):
    """Register data sets. Factory context: ``split`` ("train", "val" or "test").
    Returns a ``torch.utils.data.Dataset`` of dict samples (:class:`mtlkit.contracts`)."""


@hookspec
def register_loggers(register):
    """Register loggers: where a run's records go besides ``log.jsonl``
    (:class:`mtlkit.engine.loggers.Logger`). Factory context: none. A factory must not
    write anything: :meth:`~mtlkit.engine.loggers.Logger.open` is called on rank 0 only,
    once training starts."""


# -- beyond components: the command line ------------------------------------------------
@hookspec
def register_commands(register):
    """Register ``mtlkit`` sub-commands:
    ``register(name, run, configure=None, help="", group=None)``.

    ``configure(parser)`` adds the command's arguments to its ``argparse`` parser; ``run(args)``
    executes it and returns the exit code (0 on success; raise :class:`mtlkit.errors.MtlkitError`
    for a one-line user error, exit code 2). ``group="data"`` makes ``mtlkit data NAME``;
    without a group the command is ``mtlkit NAME``. A name taken by another plugin, or by a
    built-in command, is an error naming both. :mod:`mtlkit.argtypes` has argument types
    (``type=`` of ``add_argument``) that refuse bad numbers and output folders in one line."""


@hookspec
def register_compare_columns(register):
    """Register extra columns of ``mtlkit compare``:
    ``register(name, value, fmt="{:.4g}", note="")``.

    ``value(summary)`` returns the column's value for one run, or None where it does not
    apply; a column is shown only when some run has a value. ``summary`` is a dict: ``run``
    (folder), ``name``, ``recipe`` (the validated :class:`mtlkit.recipe.schema.Recipe`),
    ``many_to_many``, ``metrics`` (``{task: {metric: mean of the last N evaluations}}``),
    ``higher_is_better``, ``params``, ``params_ratio``, ``evaluations``. ``fmt`` formats a
    number (a string value is shown as it is); ``note``, one phrase saying what the column
    is, is added to the table's title whenever the column is shown."""


# -- beyond components: data sets' own files ------------------------------------------------
@hookspec
def register_result_writers(register):
    """Register writers of a data set's official results file for a whole split:
    ``register(dataset, write, description="")``.

    ``mtlkit predict RUN_DIR --split SPLIT --out DIR`` on a run whose data sets are all
    ``dataset`` (the registered data set name) calls ``write(run, split, out_dir)`` and
    prints the paths it returns. ``run`` is a :class:`mtlkit.loaded_run.LoadedRun`: the
    model (eval mode, best else last weights), ``tasks``, ``recipe`` and
    ``run.dataset(task, split)``, the task's data set built as training builds it (``task``
    None in the one-to-many setting). Raise :class:`mtlkit.errors.MtlkitError` for a
    one-line user error; a data set with two writers is an error naming both plugins."""


@hookspec
def register_data_sources(register):
    """Declare where a data set's published files come from, for ``mtlkit data fetch NAME ROOT``:
    ``register(dataset, archives, recipe=None, description="")``.

    ``archives``: a list of :class:`mtlkit.fetch.Archive`, each with its ``name``, ``url``,
    ``format`` ("zip", "tar", "tar.gz"), ``size`` (bytes) and ``sha256`` where published
    (else None), ``places`` (``(marker, destination)``: the unpacked folder that holds the
    path ``marker`` becomes ``ROOT/destination``) and ``inner`` (a glob of archives inside it,
    unpacked where they lie first). ``recipe``: a recipe (built-in name or file) that reads
    ``dataset``; after unpacking, the fetch makes the data checks ``mtlkit validate`` makes
    on it with every ``dataset`` root pointed at the new folder. A data set declared twice
    is an error naming both plugins."""
