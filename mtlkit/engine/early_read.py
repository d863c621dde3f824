"""A small read from the device that starts early and is collected later.

Reading a value back (``tolist``) waits for every kernel queued so far: read right after
a step's backward passes, the device runs dry until the host has launched the rest of the
step. :class:`EarlyRead` instead copies a few values into pinned host memory as soon as
they are computed (a non-blocking copy ordered on the current stream, marked by an event)
and hands them over when asked: the host then waits only for the work queued *before* the
copy, while the kernels queued after it (the backward passes) keep the device busy.

On the CPU (and on devices without events) the values are simply read when asked.
"""

from __future__ import annotations

import torch
from torch import Tensor


class EarlyRead:
    """``EarlyRead(values)`` starts the copy; ``result()`` returns ``values.tolist()``."""

    def __init__(self, values: Tensor) -> None:
        values = values.detach()
        self._event = None
        if values.device.type == "cuda":
            self._host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self._host.copy_(values, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = values
        self._value: list | None = None

    def result(self) -> list:
        """The values (read once; later calls return the same list)."""
        if self._value is None:
            if self._event is not None:
                self._event.synchronize()
            self._value = self._host.tolist()
        return self._value
