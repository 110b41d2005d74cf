"""Whether this process is one rank of several: every collective in the project asks here first.

The same code runs in one process (tests, a laptop) and in a DDP worker group; a collective is only called
when ``torch.distributed`` is initialised.
"""

from __future__ import annotations

import torch


def is_distributed() -> bool:
    """True inside an initialised ``torch.distributed`` process group."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()
