"""Device names a user may give (``--device``, a strategy's ``--param device``), checked before any work.

torch is imported only when a CUDA device is named, so checking ``cpu`` or ``auto`` stays light.
"""

from __future__ import annotations

import re

from alselect.errors import AlselectError, UsageError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


def check_device(spec: object, option: str) -> str:
    """``spec`` when it names a device this machine has; ``option`` (``--device``, or
    ``--param device=``) names the source.

    Anything but auto, cpu, cuda, cuda:N is a usage error (exit 2); a CUDA device on a machine without
    CUDA, or one past the last GPU, is a runtime error (exit 1), as for ``--device``.
    """
    named = f"{option}{spec}" if option.endswith("=") else f"{option} {spec}"
    if not isinstance(spec, str) or _DEVICE.fullmatch(spec) is None:
        raise UsageError(f"{named}: use {DEVICE_CHOICES}")
    if spec.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise AlselectError(f"{named}: CUDA is not available on this machine")
        index = int(spec.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise AlselectError(f"{named}: only {torch.cuda.device_count()} CUDA device(s) present")
    return spec
