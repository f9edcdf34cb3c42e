"""zeroadam: a memory-efficient, ZeRO-style sharded Adam/AdamW optimizer for PyTorch."""
from . import checkpoint
from .amp import GradScaler
from .optimizer import ZeroAdam
from .options import BLOCK_SIZE, MIN_QUANT_NUMEL
from .reference import adamw_reference
from .sharded_model import full_state_dict, shard_model

__all__ = ["ZeroAdam", "GradScaler", "checkpoint", "shard_model", "full_state_dict", "adamw_reference", "BLOCK_SIZE", "MIN_QUANT_NUMEL", "__version__"]
__version__ = "0.1.0"
