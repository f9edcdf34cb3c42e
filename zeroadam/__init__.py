"""zeroadam: a memory-efficient, ZeRO-style sharded Adam/AdamW optimizer for PyTorch."""
from zeroadam import checkpoint
from zeroadam._version import __version__
from zeroadam.amp import GradScaler
from zeroadam.optimizer import ZeroAdam
from zeroadam.options import BLOCK_SIZE, MIN_QUANT_NUMEL
from zeroadam.reference import adamw_reference
from zeroadam.sharding.model import full_state_dict, shard_model

__all__ = ["ZeroAdam", "GradScaler", "checkpoint", "shard_model", "full_state_dict", "adamw_reference", "BLOCK_SIZE", "MIN_QUANT_NUMEL", "__version__"]

