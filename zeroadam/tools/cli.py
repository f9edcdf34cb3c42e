"""The ``zeroadam`` command: demo | estimate | consolidate | inspect.

Each subcommand's options and work live with the module it belongs to; this file only wires them up.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

__all__ = ["main"]

# subcommand -> (module, help); the module defines add_arguments(parser) and run(args) -> int
_COMMANDS = {
    "demo": ("zeroadam.tools.demo", "train a small GPT on 2 processes with ZeroAdam and DDP + AdamW, and compare"),
    "estimate": ("zeroadam.tools.memory", "estimate per-GPU and per-host memory for a model size and setup"),
    "consolidate": ("zeroadam.checkpoint", "write a plain model (and AdamW) state dict from a checkpoint"),
    "inspect": ("zeroadam.checkpoint", "print what a checkpoint directory holds"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zeroadam", description="zeroadam: sharded 8-bit AdamW for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(module)
        getattr(mod, f"add_{name}_arguments")(p)
        p.set_defaults(_run=getattr(mod, f"run_{name}"))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
