"""distshard: load one sharded checkpoint into a model across a torch.distributed job, with each
file read by one rank and the tensors sent to the ranks that need them."""

from __future__ import annotations

from .errors import DistShardError, RankFailure
from .hf import from_pretrained
from .loader import DEFAULT_BUCKET_SIZE, DEFAULT_TIMEOUT, LoadOptions, load
from .report import LoadReport
from .writer import SaveReport, save

__all__ = [
    "DEFAULT_BUCKET_SIZE",
    "DEFAULT_TIMEOUT",
    "DistShardError",
    "LoadOptions",
    "LoadReport",
    "RankFailure",
    "SaveReport",
    "from_pretrained",
    "load",
    "save",
]
__version__ = "0.1.0"
