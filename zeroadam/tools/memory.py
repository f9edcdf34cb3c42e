"""Memory estimates for ZeroAdam, DDP + torch AdamW and DeepSpeed ZeRO, and the ``zeroadam estimate`` command.

The live counterpart is ``ZeroAdam.memory_stats()``, which reports what one rank holds; this module predicts the
same categories for a model that may not fit anywhere yet, from its parameter count (or a Hugging Face config).
Every ZeroAdam number comes from the sizing rules the engines allocate with (``zeroadam/sizes.py``).

[Note: memory formulas]
Ψ is the number of parameters, N the data-parallel world size, P the bytes of one parameter (2 for bf16 / fp16,
4 for fp32), b = min(bucket_size, Ψ). Bytes per parameter by category:

* moments: int8 2 B (one byte each for exp_avg and exp_avg_sq) + 2 × 4 / 256 B (one fp32 scale per 256-element
  block each), bf16 4 B, fp32 8 B. Tensors under MIN_QUANT_NUMEL elements keep fp32 moments; with a per-tensor
  list of sizes (``--config``) they are counted exactly, from a bare count they are not (their share is tiny).
* master (16-bit parameters only; an fp32 parameter is its own master): fp32 4 B, compact 1 B (an int8
  residual), none 0 B; "auto" is compact.
* Partitioning: stage 1 divides moments and master by N; stage 2 also replaces the full gradients with an fp32
  shard of 4 / N B; stage 3 also divides the parameters by N. Shards are whole 256-element blocks, so each rank
  holds up to one block more than Ψ / N per flat buffer (``sharded_moment_bytes`` counts that exactly).

ZeroAdam, per GPU:

    category   stage 0          stage 1                 stage 2               stage 3
    params     PΨ               PΨ                      PΨ                    PΨ / N
    grads      PΨ               PΨ + 4Ψ / N             4Ψ / N                4Ψ / N
    moments    MΨ               MΨ / N                  MΨ / N                MΨ / N
    master     WΨ               WΨ / N                  WΨ / N                WΨ / N
    buffers    PΨ (DDP)         4(N + 1)c               8b                    (P + 4)R + 2PU + 4U

Buffers are what the implementation allocates for communication ([Note: communication buffers] in sizes.py):
stage 0 runs under DDP, whose buckets hold a copy of every gradient (``gradient_as_bucket_view=False``, its
default). Stage 1 reduce-scatters at ``step()`` through one fp32 staging buffer of N + 1 chunks of c = b / N
elements (``stage1_staging_numel``); the all-gather after the update is in place. Stage 2 keeps two consecutive
fp32 buckets alive (one reducing, one filling); a bucket is b elements plus up to one tensor, so with
``--config`` the buckets are laid out as the engine lays them out (``stage2_peak_bucket_numel``), and from a bare
count each is taken as b. Stage 3 (``shard_model``) gathers whole units: the root unit (embeddings, output head,
final norm; R elements) stays gathered through forward and backward with its fp32 gradient buffer, and of the
transformer blocks (U elements each) the current one and one prefetched are gathered, with one fp32 gradient
buffer filling (``stage3_peak_buffer_bytes``). With ``--config`` R and U come from the model; from a bare count
both are taken as b.
With ``offload="cpu"`` the moments, the master and the fp32 gradient shard live in host memory instead, with a
host copy of the parameter shard and a pinned fp32 staging shard for the gradient copies. With ``offload_params``
(stage 3, ``shard_model(offload_params=True)``) the parameter shard PΨ / N moves to the host as well, updated
there in place (no host copy), and the fp32 gradient shard lives there too: the GPU keeps only the buffers, whose
gathered units now also need the device staging shards of the prefetched units (``stage3_staging_bytes``). For
DeepSpeed, ``offload_param`` moves its 16-bit partitions (2Ψ / N) to the host likewise. Offloading at stage 0
partitions nothing: every rank keeps (and offloads) the whole state in one flat buffer per space, and a DDP
wrapper averages the gradients (``ZeroEngine.create`` runs it on a group of one rank).

DDP + torch AdamW is the usual mixed-precision recipe: fp32 parameters (autocast computes in 16 bits), fp32
gradients, fp32 exp_avg and exp_avg_sq: 4 + 4 + 8 = 16 B per parameter on every GPU, plus DDP's bucket copy of
the gradients (4Ψ).

DeepSpeed ZeRO follows the ZeRO paper's mixed-precision accounting (Rajbhandari et al. 2020, section 3.1):
16-bit parameters 2Ψ and gradients 2Ψ, and K = 12 bytes of optimizer state (fp32 master 4 + fp32 moments 8),
16Ψ in all, partitioned per stage as above (section 5). Its buffers are its default buckets, in 16-bit
elements: stages 1-2 a reduce bucket and an all-gather bucket of 5e8 elements each, stage 3 a reduce bucket of
5e8 and a prefetch bucket of 5e7 (DeepSpeedZeroConfig defaults), each capped at Ψ. Its CPU offload moves the
master and moments to the host, with an fp32 gradient partition (4Ψ / N) for the CPU optimizer; it needs
stage >= 1.

Nothing here counts activations, the CUDA context or allocator fragmentation: "fits" leaves a share of each
card for them (``--usable-fraction``).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple, Optional, Sequence, get_args

from zeroadam import sizes
from zeroadam.options import BLOCK_SIZE, MIN_QUANT_NUMEL, GradDtype, MasterWeights, Offload, StateDtype, ZeroOptions
from zeroadam.sizes import padded

__all__ = [
    "CATEGORIES",
    "ParamDtype",
    "Setup",
    "Placement",
    "CARDS",
    "param_bytes_per_param",
    "moment_bytes_per_param",
    "master_bytes_per_param",
    "moment_bytes",
    "sharded_moment_bytes",
    "zeroadam_memory",
    "ddp_adamw_memory",
    "deepspeed_memory",
    "fsdp2_memory",
    "grad_bytes_per_param",
    "parse_count",
    "ModelTensors",
    "config_tensors",
    "add_estimate_arguments",
    "run_estimate",
]

ParamDtype = Literal["fp32", "bf16", "fp16"]

CATEGORIES: tuple[str, ...] = ("params", "grads", "moments", "master", "buffers")

# (name, GiB). Cards sharing a size are listed once under the most common names.
CARDS: tuple[tuple[str, float], ...] = (
    ("V100-16", 16),
    ("RTX 4090-24", 24),
    ("A100-40", 40),
    ("L40S-48", 48),
    ("A100-80 / H100-80", 80),
    ("H200-141", 141),
)

# DeepSpeedZeroConfig defaults, in elements.
_DS_REDUCE_BUCKET = 500_000_000
_DS_ALLGATHER_BUCKET = 500_000_000
_DS_PREFETCH_BUCKET = 50_000_000

_GIB = 1024**3


def _bad(arg: str, value: object, allowed: str) -> ValueError:
    return ValueError(f"zeroadam estimate: invalid {arg}={value!r}; {allowed}")


@dataclass(frozen=True, kw_only=True)
class Setup:
    """One training setup: what the formulas of [Note: memory formulas] are functions of."""

    world_size: int
    """N, the data-parallel world size (GPUs sharing the partitioned state)."""
    stage: int = 2
    """ZeRO stage 0-3, for ZeroAdam and for the DeepSpeed comparison alike."""
    state_dtype: StateDtype = "int8"
    master_weights: MasterWeights = "auto"
    param_dtype: ParamDtype = "bf16"
    """Storage of the model's parameters; bf16 is the usual choice for large models."""
    offload: Optional[Offload] = None
    bucket_size: int = 5_000_000
    """Elements per stage-2 gradient bucket (ZeroAdam's default)."""
    offload_params: bool = False
    """Stage 3 with ``offload="cpu"``: the parameter shards live on the host too (``shard_model(offload_params=True)``)."""
    nodes: int = 1
    """Machines; > 1: hybrid sharding over a (nodes, world_size // nodes) mesh, state split within a node only."""
    quantized_weights: bool = False
    """int8 parameter all-gathers (ZeRO++ qwZ): changes the bytes sent, not the memory."""
    quantized_gradients: bool = False
    """int8 gradient reductions (ZeRO++ qgZ): changes the bytes sent, not the memory."""
    grad_dtype: GradDtype = "fp32"
    """The gradient shard's, buckets' and reductions' dtype (ZeroAdam's grad_dtype)."""
    release_grads: bool = False
    """ZeroAdam's release_grads: no gradient shard is kept (only the unit or bucket being reduced)."""

    def __post_init__(self) -> None:
        # The optimizer's own validation, so both accept and reject the same values with the same messages.
        ZeroOptions(
            state_dtype=self.state_dtype,
            master_weights=self.master_weights,
            stage=self.stage,
            offload=self.offload,
            bucket_size=self.bucket_size,
            quantized_weights=self.quantized_weights,
            quantized_gradients=self.quantized_gradients,
            grad_dtype=self.grad_dtype,
            release_grads=self.release_grads,
        )
        if not isinstance(self.nodes, int) or isinstance(self.nodes, bool) or self.nodes < 1:
            raise _bad("nodes", self.nodes, "expected a whole number >= 1")
        if self.nodes > 1 and (self.world_size % self.nodes or self.stage == 0):
            raise _bad(
                "nodes", self.nodes, f"hybrid sharding needs the world size ({self.world_size}) to be a multiple of the "
                f"number of nodes and a stage of 1-3 (got stage {self.stage})"
            )
        if self.param_dtype not in get_args(ParamDtype):
            raise _bad("param_dtype", self.param_dtype, "expected one of 'fp32', 'bf16', 'fp16'")
        if self.offload_params and (self.stage != 3 or self.offload != "cpu"):
            raise _bad(
                "offload_params", self.offload_params, f"needs stage 3 and offload 'cpu' (got stage {self.stage}, "
                f"offload {self.offload!r}): only stage 3 shards the parameters, and their update runs on the host"
            )
        if not isinstance(self.world_size, int) or isinstance(self.world_size, bool) or self.world_size < 1:
            raise _bad("world_size", self.world_size, "expected a whole number >= 1")


@dataclass(frozen=True)
class Placement:
    """Bytes by category on one GPU, and in host memory on behalf of that GPU."""

    gpu: dict[str, float]
    host: dict[str, float] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def gpu_total(self) -> float:
        return sum(self.gpu.values())

    @property
    def host_total(self) -> float:
        return sum(self.host.values())


# ---------------------------------------------------------------------------------------------- formulas
def param_bytes_per_param(param_dtype: ParamDtype) -> int:
    return 4 if param_dtype == "fp32" else 2


def grad_bytes_per_param(grad_dtype: GradDtype, param_dtype: ParamDtype) -> int:
    """Bytes of one element of the gradient shards, buckets and reductions (``zeroadam.options.grad_dtype_for``)."""
    return 2 if grad_dtype == "bf16" or (grad_dtype == "auto" and param_dtype == "bf16") else sizes.GRAD_BYTES


def moment_bytes_per_param(state_dtype: StateDtype) -> float:
    """exp_avg + exp_avg_sq storage per parameter of a tensor that takes the ``state_dtype`` path."""
    return sizes.moment_bytes(state_dtype, BLOCK_SIZE) / BLOCK_SIZE


def _master_kind(master_weights: MasterWeights, param_dtype: ParamDtype) -> sizes.MasterKind:
    """What ``ZeroAdam`` stores for a parameter of this dtype (an fp32 parameter is its own master)."""
    if param_dtype == "fp32":
        return "param"
    return "compact" if master_weights == "auto" else master_weights


def master_bytes_per_param(master_weights: MasterWeights, param_dtype: ParamDtype) -> float:
    return float(sizes.MASTER_BYTES[_master_kind(master_weights, param_dtype)])


def _moment_format(numel: int, state_dtype: StateDtype) -> StateDtype:
    return state_dtype if numel >= MIN_QUANT_NUMEL else "fp32"


def _spaces(numels: Sequence[int], state_dtype: StateDtype) -> dict[StateDtype, list[int]]:
    """Tensor sizes by moment format, in order: the flat buffers of stages 1-2 (``zeroadam.layout.group_spaces``)."""
    out: dict[StateDtype, list[int]] = {}
    for n in numels:
        out.setdefault(_moment_format(n, state_dtype), []).append(n)
    return out


def _shard(numels: Sequence[int], world_size: int) -> int:
    """Elements of each rank's shard of one flat buffer of tensors of these sizes."""
    return sizes.shard_numel(sum(padded(n) for n in numels), world_size)


def moment_bytes(numels: Sequence[int], state_dtype: StateDtype) -> int:
    """Exact unsharded moment bytes of tensors of these sizes (stage 0: each tensor is its own run)."""
    return sum(sizes.moment_bytes(_moment_format(n, state_dtype), n) for n in numels)


def sharded_moment_bytes(numels: Sequence[int], state_dtype: StateDtype, world_size: int) -> int:
    """Exact moment bytes one rank holds at stage >= 1, for one param group of one dtype.

    Tensors of each moment format share a flat buffer, each starting on a block; the buffer is padded to whole
    blocks per rank (``zeroadam.layout.FlatLayout``), and every rank's shard has the same length.
    """
    return sum(sizes.moment_bytes(fmt, _shard(ns, world_size)) for fmt, ns in _spaces(numels, state_dtype).items())


def _cap(bucket: int, num_params: float) -> float:
    return float(min(bucket, num_params))


def _buffers(psi: float, p: int, stage: int, n: int, setup: Setup, model: Optional[ModelTensors]) -> float:
    """Communication buffers of one rank; see [Note: communication buffers] in zeroadam/sizes.py."""
    b = _cap(setup.bucket_size, psi)
    g = grad_bytes_per_param(setup.grad_dtype, setup.param_dtype)
    if stage == 0:
        return p * psi if n > 1 else 0.0  # DDP's bucket copy of the gradients
    if stage == 1:
        if model is None:
            shards = [sizes.shard_numel(padded(int(psi)), n)]
        else:
            shards = [_shard(ns, n) for ns in _spaces(model.numels, setup.state_dtype).values()]
        # One buffer serves every flat buffer, grown to the largest.
        return float(g * max(sizes.stage1_staging_numel(setup.bucket_size, n, s) for s in shards))
    if stage == 2:
        if model is None:
            return g * sizes.BUCKETS_IN_FLIGHT * b
        spaces = list(_spaces(model.numels, setup.state_dtype).values())
        return float(g * sizes.stage2_peak_bucket_numel(spaces, setup.bucket_size))
    if model is None:
        return float(sizes.stage3_peak_buffer_bytes(int(b), int(b), 1 + sizes.DEFAULT_PREFETCH, p, g))
    # Unit flat buffers hold whole blocks per rank (one flat per dtype and unit, whatever the moment format).
    root_total = n * _shard(model.root, n) if model.root else 0
    block_total = n * _shard(model.block, n) if model.block else 0
    return float(sizes.stage3_peak_buffer_bytes(root_total, block_total, model.layers, p, g))


def _grad_shards(psi: float, n: int, stage: int, setup: Setup, model: Optional[ModelTensors]) -> float:
    """The gradient shards the update reads: 4 / N bytes per parameter (2 / N in bf16), in whole blocks with a
    model. With ``release_grads`` none is kept: each unit's (bucket's) shard lives only until its update, inside
    the communication buffers counted with them."""
    g = grad_bytes_per_param(setup.grad_dtype, setup.param_dtype)
    if setup.release_grads and stage >= 2:
        return 0.0
    if model is None:
        return g * psi / n
    if stage <= 2:
        return float(sum(sizes.grad_shard_bytes(_shard(ns, n), g) for ns in _spaces(model.numels, setup.state_dtype).values()))
    root = sizes.grad_shard_bytes(_shard(model.root, n), g) if model.root else 0
    block = sizes.grad_shard_bytes(_shard(model.block, n), g) if model.block else 0
    return float(root + model.layers * block)


def zeroadam_memory(num_params: float, setup: Setup, *, model: Optional[ModelTensors] = None) -> Placement:
    """ZeroAdam's bytes per GPU (and host, with offload) by category; see [Note: memory formulas].

    ``model``, the sizes of the model's tensors, makes the moments and gradient shards exact (small tensors in
    fp32, block padding) and gives the buffers the model's own buckets (stage 2) and units (stage 3).
    """
    psi, n = float(num_params), setup.world_size // setup.nodes  # the ranks sharing the state (a node with a mesh)
    p = param_bytes_per_param(setup.param_dtype)
    w = master_bytes_per_param(setup.master_weights, setup.param_dtype)
    stage = setup.stage
    shard = n if stage >= 1 else 1
    if model is None:
        moments = moment_bytes_per_param(setup.state_dtype) * psi / shard
    elif stage == 0 and setup.offload is not None:  # one rank's flat buffers: whole, block-padded
        moments = float(sharded_moment_bytes(model.numels, setup.state_dtype, 1))
    elif stage == 0:
        moments = float(moment_bytes(model.numels, setup.state_dtype))
    elif stage <= 2:
        moments = float(sharded_moment_bytes(model.numels, setup.state_dtype, n))
    else:  # one flat buffer per unit
        root = sharded_moment_bytes(model.root, setup.state_dtype, n) if model.root else 0
        block = sharded_moment_bytes(model.block, setup.state_dtype, n) if model.block else 0
        moments = float(root + model.layers * block)
    master = w * psi / shard
    params = p * psi / (n if stage >= 3 else 1)
    full_grads = p * psi if stage <= 1 else 0.0
    grad_shard = _grad_shards(psi, n, stage, setup, model) if stage >= 1 else 0.0
    buffers = _buffers(psi, p, stage, n, setup, model)
    notes = []
    if setup.stage == 3 and model is None:
        notes.append("stage 3 units taken as one bucket each; pass --config for the model's own")
    if setup.stage == 2 and model is None and setup.bucket_size < psi:
        notes.append("stage 2 buckets taken as --bucket-size elements (a bucket holds whole tensors); pass --config for the model's own")
    if setup.offload is None:
        gpu = {"params": params, "grads": full_grads + grad_shard, "moments": moments, "master": master, "buffers": buffers}
        return Placement(gpu, notes=tuple(notes))
    if setup.offload_params:
        # The shards live on the host, where the update writes them in place; the device holds the gathered units
        # (buffers) and the staging shards their gathers copy in.
        unit = float(n * _shard(model.block, n)) if model is not None and model.block else _cap(setup.bucket_size, psi)
        buffers += sizes.stage3_staging_bytes(int(unit), n, p)
        gpu = {"params": 0.0, "grads": 0.0, "moments": 0.0, "master": 0.0, "buffers": buffers}
        host = {"params": params, "grads": grad_shard, "moments": moments, "master": master, "buffers": 4 * psi / shard}
        notes.append("offload_params: parameters reach the GPU only while their unit is gathered (in buffers)")
        return Placement(gpu, host, tuple(notes))
    gpu = {"params": params, "grads": full_grads, "moments": 0.0, "master": 0.0, "buffers": buffers}
    # A host copy of the parameter shard (the CPU update writes it) and a pinned staging shard (gradients).
    g = grad_bytes_per_param(setup.grad_dtype, setup.param_dtype)
    host_buffers = p * psi / shard + g * psi / shard
    host = {"params": 0.0, "grads": g * psi / shard, "moments": moments, "master": master, "buffers": host_buffers}
    if setup.stage == 0 and n > 1:
        notes.append("offload at stage 0 keeps the whole state on every rank's host; stage 1 partitions it")
    return Placement(gpu, host, tuple(notes))


QUANTIZED_BYTES = 1 + 4 / 256  # an int8 code per element and an fp32 scale per block of 256 (comm/quantized.py)


def cross_node_bytes(num_params: float, setup: Setup, gpus_per_node: int, grad_bytes: Optional[float] = None) -> float:
    """Bytes one GPU sends per step over collectives that span machines (ring algorithms: (k - 1) / k of a
    collective's buffer over k ranks). Flat ZeRO: every collective spans the world, so a reduce-scatter of fp32
    gradients and one (stages 1-2) or two (stage 3: forward and backward) parameter all-gathers; with hybrid sharding
    (``setup.nodes`` > 1) gathers and reduce-scatters stay within a node and only the all-reduce of each reduced
    gradient shard (Ψ / S elements) crosses machines. 0 on one machine. ``grad_bytes``: bytes per reduced gradient
    element where they are not ZeroAdam's fp32 (DeepSpeed reduces in the parameters' dtype)."""
    n = setup.world_size
    if n <= gpus_per_node:
        return 0.0
    psi, p = float(num_params), param_bytes_per_param(setup.param_dtype)
    sixteen = setup.grad_dtype == "bf16" or (setup.grad_dtype == "auto" and setup.param_dtype == "bf16")
    grad_b = QUANTIZED_BYTES if setup.quantized_gradients else (grad_bytes or (2.0 if sixteen else 4.0))
    weight_b = QUANTIZED_BYTES if setup.quantized_weights else float(p)
    if setup.nodes > 1:
        shards, replicas = n // setup.nodes, setup.nodes
        return 2 * (replicas - 1) / replicas * psi / shards * grad_b
    if setup.stage == 0:
        return 2 * (n - 1) / n * psi * p  # DDP's all-reduce of the gradients
    gathers = 2 if setup.stage == 3 else 1
    return (n - 1) / n * psi * (grad_b + gathers * weight_b)


def ddp_adamw_memory(num_params: float, world_size: int) -> Placement:
    """DDP + torch.optim.AdamW with fp32 parameters and autocast: 16 B per parameter plus DDP's buckets."""
    psi = float(num_params)
    gpu = {"params": 4 * psi, "grads": 4 * psi, "moments": 8 * psi, "master": 0.0, "buffers": 4 * psi if world_size > 1 else 0.0}
    return Placement(gpu)


def deepspeed_memory(num_params: float, setup: Setup) -> Placement:
    """DeepSpeed ZeRO of ``setup.stage``: the ZeRO paper's 2 + 2 + 12 bytes, partitioned, plus default buckets."""
    psi, n, stage = float(num_params), setup.world_size, setup.stage
    params = 2 * psi / (n if stage >= 3 else 1)
    grads = 2 * psi / (n if stage >= 2 else 1)
    master = 4 * psi / (n if stage >= 1 else 1)
    moments = 8 * psi / (n if stage >= 1 else 1)
    if stage == 0:
        buffers = 2 * _cap(_DS_REDUCE_BUCKET, psi)
    elif stage <= 2:
        buffers = 2 * (_cap(_DS_REDUCE_BUCKET, psi) + _cap(_DS_ALLGATHER_BUCKET, psi))
    else:
        buffers = 2 * (_cap(_DS_REDUCE_BUCKET, psi) + _cap(_DS_PREFETCH_BUCKET, psi))
    if setup.offload is None or stage == 0:
        notes = ("DeepSpeed offloads only at stage >= 1; shown without offload",) if setup.offload else ()
        return Placement({"params": params, "grads": grads, "moments": moments, "master": master, "buffers": buffers}, notes=notes)
    gpu = {"params": params, "grads": grads, "moments": 0.0, "master": 0.0, "buffers": buffers}
    host = {"params": 0.0, "grads": 4 * psi / n, "moments": moments, "master": master, "buffers": 0.0}
    if setup.offload_params:  # offload_param: the 16-bit partitions live on the host between uses
        gpu["params"], host["params"] = 0.0, params
    return Placement(gpu, host)


def fsdp2_memory(num_params: float, setup: Setup) -> Placement:
    """FSDP2 (``fully_shard``) with bf16 mixed precision (``MixedPrecisionPolicy(param_dtype=bf16,
    reduce_dtype=fp32)``), fp32 sharded parameters as the master and fp32 torch AdamW: 4 + 4 + 8 = 16 B / N, plus
    one unit gathered in bf16 with its bf16 gradient and one prefetched (a unit taken as ``bucket_size``)."""
    psi, n = float(num_params), setup.world_size
    unit = _cap(setup.bucket_size, psi)
    gpu = {"params": 4 * psi / n, "grads": 4 * psi / n, "moments": 8 * psi / n, "master": 0.0,
           "buffers": 2 * 2 * unit + 2 * unit}
    return Placement(gpu, notes=("FSDP2 units taken as --bucket-size elements",))


# ---------------------------------------------------------------------------------------------- model sizes
_SUFFIX = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_count(text: str) -> int:
    """A parameter count: 7e9, 7B, 1.5b, 350M, 124439808."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmbgt]?)\s*", text.lower())
    if not m:
        raise _bad("params", text, "expected a count such as 7e9, 7B, 350M or 124439808")
    value = float(m.group(1)) * _SUFFIX[m.group(2)]
    if not math.isfinite(value) or value < 1:
        raise _bad("params", text, "expected a count of at least 1")
    return int(round(value))


def _field(cfg: dict[str, Any], *names: str, default: Any = None) -> Any:
    for name in names:
        if cfg.get(name) is not None:
            return cfg[name]
    if default is None:
        raise _bad("config", f"model_type {cfg.get('model_type')!r}", f"the field {names[0]!r} is missing")
    return default


class ModelTensors(NamedTuple):
    """Parameter tensor sizes of a transformer, split as ``shard_model`` splits it into units."""

    root: list[int]  # embeddings, final norm, untied output head: the root unit
    block: list[int]  # one transformer block
    layers: int
    embeddings: int = 0  # how many of root's tensors come before the blocks in the model (the rest follow them)

    @property
    def numels(self) -> list[int]:
        """Every tensor's size in the model's order, which is the order of the flat buffers and their buckets."""
        return self.root[: self.embeddings] + self.block * self.layers + self.root[self.embeddings :]

    @property
    def num_params(self) -> int:
        return sum(self.root) + sum(self.block) * self.layers


def _gpt2_tensors(cfg: dict[str, Any]) -> ModelTensors:
    v, d = _field(cfg, "vocab_size"), _field(cfg, "n_embd", "hidden_size")
    layers = _field(cfg, "n_layer", "num_hidden_layers")
    positions = _field(cfg, "n_positions", "max_position_embeddings")
    inner = _field(cfg, "n_inner", default=4 * d)
    block = [d, d, d * 3 * d, 3 * d, d * d, d, d, d, d * inner, inner, inner * d, d]  # ln_1, attn, ln_2, mlp
    root = [v * d, positions * d, d, d]  # wte, wpe, ln_f
    if not _field(cfg, "tie_word_embeddings", default=True):
        root.append(v * d)
    return ModelTensors(root, block, layers, embeddings=2)


def _llama_tensors(cfg: dict[str, Any]) -> ModelTensors:
    v, h = _field(cfg, "vocab_size"), _field(cfg, "hidden_size")
    inter, layers = _field(cfg, "intermediate_size"), _field(cfg, "num_hidden_layers")
    heads = _field(cfg, "num_attention_heads")
    kv = _field(cfg, "num_key_value_heads", default=heads)
    head_dim = _field(cfg, "head_dim", default=h // heads)
    # Qwen2 always has q/k/v biases; Llama-style configs say so with attention_bias (which also covers o_proj).
    qkv_bias = bool(cfg.get("attention_bias")) or cfg.get("model_type") == "qwen2"
    o_bias, mlp_bias = bool(cfg.get("attention_bias")), bool(cfg.get("mlp_bias"))
    q, k = heads * head_dim, kv * head_dim
    attn = [h * q, h * k, h * k, q * h] + ([q, k, k] if qkv_bias else []) + ([h] if o_bias else [])
    mlp = [h * inter, h * inter, inter * h] + ([inter, inter, h] if mlp_bias else [])
    root = [v * h, h]  # embed_tokens, final norm
    if not _field(cfg, "tie_word_embeddings", default=False):
        root.append(v * h)
    return ModelTensors(root, attn + mlp + [h, h], layers, embeddings=1)


def config_tensors(cfg: dict[str, Any]) -> ModelTensors:
    """The parameter tensors of a GPT-2 or Llama / Mistral / Qwen2-style Hugging Face config, from its JSON fields
    alone (tied embeddings counted once)."""
    model_type = cfg.get("model_type")
    if model_type == "gpt2" or "n_embd" in cfg:
        return _gpt2_tensors(cfg)
    if all(k in cfg for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")):
        return _llama_tensors(cfg)
    raise _bad(
        "config",
        f"model_type {model_type!r}",
        "expected a GPT-2 config (n_embd, n_layer, ...) or a Llama-style one (hidden_size, intermediate_size, "
        "num_hidden_layers, num_attention_heads, ...); pass --params instead",
    )


# ---------------------------------------------------------------------------------------------- the command
def add_estimate_arguments(parser: argparse.ArgumentParser) -> None:
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--params", type=str, help="number of parameters: 7e9, 7B, 350M, ...")
    size.add_argument("--config", type=Path, help="a Hugging Face config.json (GPT-2 or Llama-style) to count")
    parser.add_argument("--world-size", type=int, default=8, help="data-parallel GPUs (default 8)")
    parser.add_argument("--stage", type=int, default=2, choices=(0, 1, 2, 3), help="ZeRO stage (default 2)")
    parser.add_argument("--state-dtype", default="int8", choices=get_args(StateDtype), help="moment storage (default int8)")
    parser.add_argument("--master-weights", default="auto", choices=get_args(MasterWeights), help="default auto (compact)")
    parser.add_argument("--param-dtype", default="bf16", choices=get_args(ParamDtype), help="default bf16")
    parser.add_argument("--offload", default=None, choices=get_args(Offload), help="keep the optimizer state on the host")
    parser.add_argument(
        "--offload-params", action="store_true",
        help="stage 3 with --offload cpu: parameter shards on the host too (shard_model(offload_params=True))",
    )
    parser.add_argument(
        "--nodes", type=int, default=1,
        help="machines; > 1 adds a hybrid-sharding column (mesh=(nodes, GPUs per node)) and cross-node bytes per step",
    )
    parser.add_argument("--quantized-weights", action="store_true", help="int8 parameter all-gathers (ZeRO++ qwZ)")
    parser.add_argument("--quantized-gradients", action="store_true", help="int8 gradient reductions (ZeRO++ qgZ)")
    parser.add_argument("--bucket-size", type=int, default=5_000_000, help="elements per gradient bucket")
    parser.add_argument("--grad-dtype", default="fp32", choices=get_args(GradDtype),
                        help="gradient shards, buckets and reductions (default fp32)")
    parser.add_argument("--release-grads", action="store_true",
                        help="update inside backward and keep no gradient shard (ZeroAdam(release_grads=True))")
    parser.add_argument("--gpus-per-host", type=int, default=None, help="default min(world size, 8)")
    parser.add_argument(
        "--gpu-memory-gib", type=float, nargs="+", default=[], help="more card sizes to check, in GiB"
    )
    parser.add_argument(
        "--usable-fraction",
        type=float,
        default=0.9,
        help="share of a card the estimate may use; the rest is left for activations and the CUDA context",
    )
    parser.add_argument("--json", action="store_true", help="print the estimate as JSON")


def _unit(values: Sequence[float]) -> tuple[str, float]:
    top = max(values, default=0.0)
    for name, size in (("GiB", _GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if top >= size:
            return name, float(size)
    return "B", 1.0


def _fits(total: float, gib: float, usable: float) -> str:
    share = total / (gib * _GIB)
    verdict = "yes" if share <= usable else ("tight" if share <= 1.0 else "no")
    return f"{verdict} ({share:.0%})"


def _report(title: str, columns: dict[str, Placement], gpus_per_host: int, cards: Sequence[tuple[str, float]],
            usable: float) -> str:
    names = list(columns)
    lines = [title, ""]
    gpu_values = [v for pl in columns.values() for v in pl.gpu.values()] + [pl.gpu_total for pl in columns.values()]
    unit, scale = _unit(gpu_values)
    width = max(18, *(len(c) + 2 for c in names))
    head = f"{'per GPU (' + unit + ')':<18}" + "".join(f"{c:>{width}}" for c in names)
    lines += [head, "-" * len(head)]
    for cat in CATEGORIES:
        lines.append(f"{cat:<18}" + "".join(f"{pl.gpu[cat] / scale:>{width}.2f}" for pl in columns.values()))
    lines.append(f"{'total':<18}" + "".join(f"{pl.gpu_total / scale:>{width}.2f}" for pl in columns.values()))
    if any(pl.host for pl in columns.values()):
        host_unit, host_scale = _unit([pl.host_total * gpus_per_host for pl in columns.values()])
        lines += ["", f"{'per host (' + host_unit + ')':<18}" + "".join(f"{c:>{width}}" for c in names)]
        lines.append(f"  ({gpus_per_host} GPUs per host; offloaded state, pinned)")
        for cat in CATEGORIES:
            vals = [pl.host.get(cat, 0.0) * gpus_per_host / host_scale for pl in columns.values()]
            if any(vals):
                lines.append(f"{cat:<18}" + "".join(f"{v:>{width}.2f}" for v in vals))
        lines.append(
            f"{'total':<18}" + "".join(f"{pl.host_total * gpus_per_host / host_scale:>{width}.2f}" for pl in columns.values())
        )
    lines += ["", f"fits on (model + optimizer without activations, within {usable:.0%} of the card):"]
    card_w = max(len(c) for c, _ in cards) + 2
    lines.append(f"{'card':<{card_w}}{'GiB':>6}" + "".join(f"{c:>{width}}" for c in names))
    for card, gib in cards:
        lines.append(
            f"{card:<{card_w}}{gib:>6g}" + "".join(f"{_fits(pl.gpu_total, gib, usable):>{width}}" for pl in columns.values())
        )
    notes = [f"{name}: {note}" for name, pl in columns.items() for note in pl.notes]
    if notes:
        lines += [""] + [f"note: {n}" for n in notes]
    return "\n".join(lines)


def run_estimate(args: argparse.Namespace) -> int:
    try:
        return _estimate(args)
    except (ValueError, OSError) as e:  # a bad count, config file or option: one line, no traceback
        print(f"zeroadam estimate: {e}" if not str(e).startswith("zeroadam") else str(e), file=sys.stderr)
        return 2


# Config fields that are sizes or counts: each must be a whole number >= 1 where a config gives it.
_CONFIG_SIZE_FIELDS = (
    "vocab_size", "n_embd", "hidden_size", "n_layer", "num_hidden_layers", "n_positions", "max_position_embeddings",
    "n_inner", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
)


def _check_arguments(args: argparse.Namespace) -> None:
    """Refuse arguments no estimate can be made for, before anything is computed (a negative card size would
    print "yes (-26%)")."""
    for gib in args.gpu_memory_gib:
        if not math.isfinite(gib) or gib <= 0:
            raise _bad("gpu_memory_gib", gib, "expected card sizes in GiB > 0")
    if args.gpus_per_host is not None and args.gpus_per_host < 1:
        raise _bad("gpus_per_host", args.gpus_per_host, "expected a whole number >= 1 (default min(world size, 8))")


def _read_config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(Path(path).read_text())
    except ValueError as e:
        raise _bad("config", str(path), f"not a JSON file ({e})") from None
    if not isinstance(cfg, dict):
        raise _bad("config", str(path), "expected a JSON object (a Hugging Face config.json)")
    for name in _CONFIG_SIZE_FIELDS:
        v = cfg.get(name)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise _bad("config", str(path), f"the field {name!r} is {v!r}; expected a whole number >= 1")
    return cfg


def _estimate(args: argparse.Namespace) -> int:
    _check_arguments(args)
    model: Optional[ModelTensors] = None
    source = ""
    if args.config is not None:
        cfg = _read_config(args.config)
        model = config_tensors(cfg)
        num_params = model.num_params
        source = f" ({cfg.get('model_type', 'unknown model type')}, {args.config})"
    else:
        num_params = parse_count(args.params)
    setup = Setup(
        world_size=args.world_size,
        stage=args.stage,
        state_dtype=args.state_dtype,
        master_weights=args.master_weights,
        param_dtype=args.param_dtype,
        offload=args.offload,
        bucket_size=args.bucket_size,
        offload_params=args.offload_params,
        quantized_weights=args.quantized_weights,
        quantized_gradients=args.quantized_gradients,
        grad_dtype=args.grad_dtype,
        release_grads=args.release_grads,
    )
    if args.nodes != 1:
        Setup(**{**asdict(setup), "nodes": args.nodes})  # the same checks as the column below, before any output
    if not 0 < args.usable_fraction <= 1:
        raise _bad("usable_fraction", args.usable_fraction, "expected a number in (0, 1]")
    gpus_per_host = args.gpus_per_host or min(setup.world_size, 8)
    zero_name = f"ZeroAdam {setup.state_dtype}" + (" offload" if setup.offload else "") + (" params" if setup.offload_params else "")
    columns = {
        zero_name: zeroadam_memory(num_params, setup, model=model),
        "DDP + AdamW": ddp_adamw_memory(num_params, setup.world_size),
        f"DeepSpeed ZeRO-{setup.stage}": deepspeed_memory(num_params, setup),
    }
    if setup.stage == 3:
        columns["FSDP2 bf16 mixed"] = fsdp2_memory(num_params, setup)
    plain = Setup(world_size=setup.world_size, stage=setup.stage, param_dtype=setup.param_dtype)  # no ZeRO++
    setups = {zero_name: setup, "DDP + AdamW": Setup(world_size=setup.world_size, stage=0, param_dtype=setup.param_dtype),
              f"DeepSpeed ZeRO-{setup.stage}": plain, "FSDP2 bf16 mixed": plain}
    if args.nodes > 1:
        hybrid = Setup(**{**asdict(setup), "nodes": args.nodes})
        name = f"ZeroAdam HSDP {args.nodes}x{setup.world_size // args.nodes}"
        columns = {name: zeroadam_memory(num_params, hybrid, model=model), **columns}
        setups[name] = hybrid
    per_node = setup.world_size // args.nodes
    cross = {
        name: cross_node_bytes(num_params, setups[name], per_node, float(param_bytes_per_param(setup.param_dtype))
                               if name.startswith(("DeepSpeed", "FSDP2")) else None)
        for name in columns
    }
    cards = list(CARDS) + [(f"custom-{g:g}", g) for g in args.gpu_memory_gib]
    if args.json:
        print(
            json.dumps(
                {
                    "num_params": num_params,
                    "setup": asdict(setup),
                    "gpus_per_host": gpus_per_host,
                    "estimates": {
                        name: {"gpu": pl.gpu, "gpu_total": pl.gpu_total, "host_per_gpu": pl.host,
                               "host_total": pl.host_total * gpus_per_host, "notes": list(pl.notes)}
                        for name, pl in columns.items()
                    },
                    "nodes": args.nodes,
                    "cross_node_bytes_per_gpu_step": cross,
                    "fits": {
                        card: {name: pl.gpu_total <= gib * _GIB * args.usable_fraction for name, pl in columns.items()}
                        for card, gib in cards
                    },
                },
                indent=2,
            )
        )
        return 0
    title = (
        f"zeroadam estimate: {num_params:,} parameters{source}; {setup.world_size} GPUs, stage {setup.stage}, "
        f"{setup.param_dtype} parameters, {setup.state_dtype} moments, master {setup.master_weights}"
        + (f", offload {setup.offload}" if setup.offload else "")
        + (", parameters offloaded" if setup.offload_params else "")
        + f", {setup.grad_dtype} gradients" + (", release_grads" if setup.release_grads else "")
    )
    print(_report(title, columns, gpus_per_host, cards, args.usable_fraction))
    if args.nodes > 1:
        unit, scale = _unit(list(cross.values()))
        print(f"\ncross-node bytes per GPU per step ({unit}; {args.nodes} machines of {per_node} GPUs, ring collectives):")
        print("".join(f"  {name}: {v / scale:.2f}\n" for name, v in cross.items()).rstrip())
    return 0
