"""The small model and global batches that the DDP-wrapper, Lightning and launcher tests train (and
tests/launch_train.py, which torchrun and accelerate launch run as a script)."""
import torch

GLOBAL_BATCH = 12  # divisible by 1, 2, 3 and 4


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(67, 97), torch.nn.Tanh(), torch.nn.Linear(97, 13))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(GLOBAL_BATCH, 67, generator=g), torch.randn(GLOBAL_BATCH, 13, generator=g)
