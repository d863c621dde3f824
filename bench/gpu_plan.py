"""What bench/gpu_bench.py measures, in which order, and how long each row is expected to take
(for its time budget): data, apart from the measuring code."""

from __future__ import annotations

# mtlkit's own step of the NYUv2 MTAN recipe, with these overrides on top of it (each set
# explicit, so that a row means the same whatever the recipe ships)
_PLAIN = {"model.attention.params.fast": False, "training.channels_last": False, "training.compile": False}
ENGINE = {
    "engine": _PLAIN,
    "engine-fast": {**_PLAIN, "model.attention.params.fast": True},
    "engine-fast-cl": {**_PLAIN, "model.attention.params.fast": True, "training.channels_last": True},
    # what the recipe ships for CUDA
    "engine-fast-cl-compile": {"model.attention.params.fast": True, "training.channels_last": True,
                               "training.compile": True},
    "engine-compile": {**_PLAIN, "training.compile": True},
}

# (model, arch, variant, precision, compile mode or None, channels_last), most telling first
# (the baseline, the shipped step, then what no session has measured yet): a row whose
# expected seconds no longer fit in --budget is skipped, so a short session measures these first.
# For mtlkit's step rows, "cuda-graph" is training.cuda_graph = "on" (torch.compile, where the
# variant has it, compiles the network inside the graph: inductor's kernels, one launch).
PLAN = [
    ("MTAN SegNet", "mtan", "plain", "fp32", None, False),  # the authors' computation: the baseline
    ("MTAN SegNet", "engine-fast-cl-compile", "mtlkit step, fast + channels-last + inductor (shipped)",
     "bf16", "cuda-graph", True),
    ("MTAN SegNet", "engine", "mtlkit step", "bf16", "cuda-graph", False),
    ("Split Wide SegNet", "split-wide", "plain", "fp32", None, False),
    ("Split Wide SegNet", "split-wide", "plain", "bf16", None, False),  # then the Decathlon and loading rows
    # not yet measured on a GPU (2026-11-28: the first failed in dynamo, since fixed; the other
    # two ran out of memory beside eleven other processes)
    ("MTAN SegNet", "_lean", "memory_efficient", "bf16", "reduce-overhead", False),
    ("MTAN SegNet", "mtan", "plain", "bf16", "reduce-overhead", False),
    ("MTAN SegNet", "_fast", "fast", "bf16", "default", False),
    # fp32 under torch.compile for the two variants that had it in bf16 only (issue 11: each
    # variant in fp32 and bf16, with and without compile)
    ("MTAN SegNet", "_fast", "fast", "fp32", "reduce-overhead", False),
    ("MTAN SegNet", "_lean", "memory_efficient", "fp32", "reduce-overhead", False),
    ("MTAN SegNet", "engine-fast-cl-compile", "mtlkit step, fast + channels-last + inductor", "bf16", None, True),
    ("MTAN SegNet", "engine-compile", "mtlkit step, inductor", "bf16", "cuda-graph", False),
    ("MTAN SegNet", "_fast", "fast", "bf16", "reduce-overhead", False),
    ("MTAN SegNet", "engine-fast", "mtlkit step, fast", "bf16", "cuda-graph", False),
    ("MTAN SegNet", "engine-fast-cl", "mtlkit step, fast + channels-last", "bf16", "cuda-graph", True),
    ("MTAN SegNet", "engine", "mtlkit step", "bf16", None, False),
    ("MTAN SegNet", "engine", "mtlkit step", "fp32", "cuda-graph", False),
    ("MTAN SegNet", "engine", "mtlkit step", "fp32", None, False),
    ("MTAN SegNet", "mtan", "plain", "bf16", None, False),
    ("MTAN SegNet", "_fast", "fast", "bf16", None, False),
    ("MTAN SegNet", "_lean", "memory_efficient", "fp32", None, False),
    ("MTAN SegNet", "_lean", "memory_efficient", "bf16", None, False),
    ("MTAN SegNet", "_fast", "fast", "fp32", None, False),
    ("MTAN SegNet", "_fast", "fast + channels-last", "bf16", None, True),
    ("MTAN SegNet", "mtan", "plain", "fp32", "reduce-overhead", False),
    ("Split Wide SegNet", "split-wide", "plain", "bf16", "reduce-overhead", False),
    ("MTAN SegNet", "mtan", "plain", "bf16", "default", False),
    ("Split Wide SegNet", "split-wide", "plain", "fp32", "reduce-overhead", False),
]
CORE = 12  # --core: the first rows of PLAN


def compiles(row: tuple) -> bool:
    """Whether a PLAN row runs inductor (torch.compile in a mode, or an ENGINE override)."""
    return row[4] in ("default", "reduce-overhead") or bool(ENGINE.get(row[1], {}).get("training.compile"))


# seconds a row is expected to take (warm-up included), for the budget; estimates. Cold: on an
# H200 machine training the tiny MTAN with compile took 122 s (a gpu test) and the bench's first
# five rows, two of them compiled, 235 s. Warm (inductor's kernels, FX graphs and AOT autograd
# results cached on disk, dynamo's tracing still to do): unmeasured on a GPU; on the 2-core
# EPYC a tiny MTAN's compile took 11 s warm against 257 s cold.
EXPECTED_SECONDS = {"cold compile": 120.0, "warm compile": 40.0, "step": 25.0, "eager": 15.0, "decathlon": 45.0}


def expected_seconds(row: tuple, warmed: set[str]) -> float:
    if compiles(row):
        return EXPECTED_SECONDS["warm compile" if row_key(row) in warmed else "cold compile"]
    return EXPECTED_SECONDS["step" if row[1].startswith("engine") else "eager"]


def row_key(row: tuple) -> str:
    return "|".join(map(str, row))
