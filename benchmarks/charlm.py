"""A tiny character-level GPT trained on real text: the CPython standard library's own ``.py`` files.

Shared by the training tests (``tests/test_training.py``) and the code-map study (``benchmarks/quant_maps.py``), so
that both train the same model on the same data. Everything is deterministic for a given Python installation: the
files are a fixed, sorted subset of the stdlib directory, the vocabulary is fixed (printable ASCII), and batches come
from an explicitly seeded generator.

Import it as ``charlm``: benchmark scripts find it in their own folder, the first entry of ``sys.path``; pytest puts
``benchmarks/`` on the tests' path (``pythonpath`` in pyproject.toml).
"""
from __future__ import annotations

import math
import os
import sysconfig
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "VOCAB",
    "GPTConfig",
    "TrainSetup",
    "CharGPT",
    "new_model",
    "Corpus",
    "load_corpus",
    "batches",
    "eval_loss",
    "train",
]

# Printable ASCII and newline; anything else (tabs, the rare non-ASCII letter in a docstring) maps to one extra
# symbol. A fixed vocabulary keeps the model's shapes independent of which files were read.
VOCAB: str = "\n" + "".join(chr(c) for c in range(32, 127))
_UNKNOWN = len(VOCAB)


@dataclass(kw_only=True)
class GPTConfig:
    vocab_size: int = len(VOCAB) + 1
    """97: printable ASCII, newline, and the unknown symbol. With d_model=64 the embedding and the output head
    (6208 elements each) are above MIN_QUANT_NUMEL, so int8 runs quantize them; their rows for rare characters
    get sparse gradients, the hardest case for exp_avg_sq codes."""
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 64
    """64 makes every attention and MLP weight >= 4096 elements, so they all take the int8 path."""
    context: int = 64
    """Long enough to see indentation and keywords, short enough for a 2-core CPU."""


@dataclass(frozen=True, kw_only=True)
class TrainSetup:
    """The training run the tests and the code-map study share."""

    steps: int = 200
    """~0.75 epochs of the 270k training characters: the held-out loss falls from ln(97) = 4.57 to about 2.3."""
    batch_size: int = 16
    peak_lr: float = 2e-3
    warmup: int = 30
    final_lr_fraction: float = 0.1
    """Linear warmup, then cosine decay to 10% of the peak. Without warmup the run is on an unstable edge: with a
    constant lr, fp32's loss after 200 steps jumps with the lr (2.5e-3: 2.31, 3e-3: 2.29, 3.5e-3: 2.55), because
    it depends on the step at which the model leaves the ~2.8 plateau, and any perturbation moves that step:
    int8 moments were 6.5% worse than fp32 at 3e-3 but 2.2% and 1.6% better at 2.5e-3 and 3.5e-3. A comparison of
    optimizers is only meaningful where fp32 itself is stable; here a 1e-6 jitter of the initial weights moves
    the held-out loss by 1e-7 (relative)."""
    weight_decay: float = 0.01
    init_seed: int = 0
    data_seed: int = 1

    def lr_at(self, step: int) -> float:
        """The lr of step ``step`` (0-based)."""
        if step < self.warmup:
            return self.peak_lr * (step + 1) / self.warmup
        t = (step - self.warmup) / max(1, self.steps - self.warmup)
        f = self.final_lr_fraction
        return self.peak_lr * (f + (1.0 - f) * 0.5 * (1.0 + math.cos(math.pi * t)))


class _Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_head = cfg.n_head
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.fc_out = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x))))


class CharGPT(nn.Module):
    """A pre-LayerNorm GPT with learned positions and an untied output head."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)
            if name.endswith("fc_out.weight") or name.endswith("proj.weight"):
                # GPT-2's scaling of residual projections by depth.
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))
            if name.endswith(".bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-character cross-entropy (nats)."""
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))


def new_model(setup: TrainSetup) -> CharGPT:
    """The initial model of every run of ``setup``: the same weights each call."""
    torch.manual_seed(setup.init_seed)
    return CharGPT(GPTConfig())


@dataclass
class Corpus:
    train: torch.Tensor  # 1D int64 character ids
    val: torch.Tensor  # 1D int64 character ids, text the model never trains on
    files: list[str]  # the stdlib files read, in order


def _encode(text: str) -> torch.Tensor:
    table = {ch: i for i, ch in enumerate(VOCAB)}
    return torch.tensor([table.get(ch, _UNKNOWN) for ch in text], dtype=torch.int64)


def load_corpus(max_chars: int = 300_000, val_fraction: float = 0.1) -> Corpus:
    """The first ``max_chars`` characters of the stdlib's top-level public modules, in sorted file order.

    Private modules (leading underscore) are skipped: several are generated (``_sysconfigdata_*``) or are large
    tables, not representative code. The last ``val_fraction`` of the text is held out.
    """
    root = sysconfig.get_paths()["stdlib"]
    names = sorted(n for n in os.listdir(root) if n.endswith(".py") and not n.startswith("_"))
    parts: list[str] = []
    files: list[str] = []
    total = 0
    for name in names:
        with open(os.path.join(root, name), encoding="utf-8", errors="replace") as f:
            text = f.read()
        parts.append(text)
        files.append(name)
        total += len(text)
        if total >= max_chars:
            break
    text = "".join(parts)[:max_chars]
    if len(text) < max_chars // 2:
        raise RuntimeError(f"charlm: only {len(text)} characters of stdlib source found under {root}")
    ids = _encode(text)
    n_val = int(len(ids) * val_fraction)
    return Corpus(train=ids[:-n_val], val=ids[-n_val:], files=files)


def batches(
    data: torch.Tensor, *, steps: int, batch_size: int, context: int, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` random (input, target) windows of ``data``; the same seed gives the same sequence."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, data.numel() - context - 1, (batch_size,), generator=g)
        offs = starts[:, None] + torch.arange(context + 1)
        win = data[offs]
        yield win[:, :-1], win[:, 1:]


@torch.no_grad()
def eval_loss(model: CharGPT, data: torch.Tensor, *, windows: int = 64, batch_size: int = 32) -> float:
    """Mean loss over ``windows`` evenly spaced, non-overlapping windows of held-out ``data``."""
    ctx = model.cfg.context
    stride = (data.numel() - ctx - 1) // windows
    assert stride >= ctx, "held-out text too short for the requested windows"
    starts = torch.arange(windows) * stride
    total = 0.0
    for i in range(0, windows, batch_size):
        offs = starts[i : i + batch_size, None] + torch.arange(ctx + 1)
        win = data[offs]
        total += float(model(win[:, :-1], win[:, 1:])) * win.shape[0]
    return total / windows


def train(
    model: CharGPT,
    step_fn: Callable[[float], None],
    data: torch.Tensor,
    setup: TrainSetup,
    *,
    on_grads: Callable[[int], None] | None = None,
) -> list[float]:
    """Train ``setup.steps`` steps; ``step_fn(lr)`` applies ``p.grad`` with this step's lr and clears it.

    Returns the per-step training losses. ``on_grads(step)`` runs after the backward pass, before ``step_fn``:
    the hook the code-map study uses to record gradients.
    """
    losses = []
    model.train()
    stream = batches(data, steps=setup.steps, batch_size=setup.batch_size, context=model.cfg.context, seed=setup.data_seed)
    for i, (x, y) in enumerate(stream):
        loss = model(x, y)
        loss.backward()
        if on_grads is not None:
            on_grads(i)
        step_fn(setup.lr_at(i))
        losses.append(loss.item())
    return losses
