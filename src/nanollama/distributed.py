"""Where we run and how the model is replicated: one process, torchrun, or srun-launched SLURM tasks.

`Cluster` is a context manager: it picks the device, starts the process group (gloo on CPU, nccl
on CUDA), wraps the model for DDP or FSDP2, and always tears down with a barrier first (without
it, gloo teardown aborts now and then).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DataParallel, DistributedDataParallel

from .config import ConfigError
from .flops import peak_flops

logger = logging.getLogger(__name__)


def native_bf16(device_type: str, cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> bool:
    """Whether bf16 matmuls run natively here: a CUDA GPU that supports bf16, or a CPU whose flags (Linux's
    /proc/cpuinfo) have AVX512-BF16 or AMX-BF16. Elsewhere (no such file, e.g. macOS) False: bf16 would
    be emulated, slower than fp32."""
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        lines = Path(cpuinfo).read_text().splitlines()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def auto_dtype(device_type: str) -> str:
    """`cluster.dtype: auto`: bf16 where it is native and faster. On CUDA, native is enough. On a CPU, flags
    say only that bf16 is not emulated, not that it is fast (an avx512_bf16 Xeon without AMX runs bf16
    matmuls at about 0.6x fp32): the two matmul peaks are measured once per machine and thread count
    (flops.peak_flops' cache, the one MFU uses) and the faster wins; both figures are logged."""
    if not native_bf16(device_type):
        return "float32"
    if device_type == "cuda":
        return "bfloat16"
    cpu = torch.device("cpu")
    bf16, fp32 = peak_flops(cpu, "bfloat16"), peak_flops(cpu, "float32")
    choice = "bfloat16" if bf16 > fp32 else "float32"
    logger.info(
        f"cluster.dtype=auto: {choice} (matmul peaks: bf16 {bf16 / 1e9:.1f}, fp32 {fp32 / 1e9:.1f} GFLOP/s)"
    )
    return choice


@dataclass
class ClusterConfig:
    device: str = "auto"  # auto | cpu | cuda
    parallelism: str = "ddp"  # ddp | fsdp (used when more than one process)
    dtype: str = "float32"  # float32 | bfloat16 (autocast, or FSDP's policy on GPU) | float16 (CUDA:
    # autocast + GradScaler) | auto (see auto_dtype)
    compile: bool = False
    matmul_precision: str = "high"  # torch.set_float32_matmul_precision
    peak_flops: float = 0.0  # one device's peak FLOP/s for MFU; 0: the GPU table, or measured (flops.py)

    def check(self) -> None:
        choices = {
            "device": ("auto", "cpu", "cuda"),
            "parallelism": ("ddp", "fsdp"),
            "dtype": ("float32", "bfloat16", "float16", "auto"),
            "matmul_precision": ("highest", "high", "medium"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(key, f"'{getattr(self, key)}' is not one of {', '.join(allowed)}")
        if self.peak_flops < 0:
            raise ConfigError("peak_flops", f"must be >= 0 (0: automatic), got {self.peak_flops}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device", "cuda requested but no GPU is visible (use device=auto or cpu)")
        if self.dtype == "auto":  # resolved here, so config.yaml records what the run used
            self.dtype = auto_dtype(self.device_type)
        if self.dtype == "float16" and self.device_type != "cuda":
            raise ConfigError("dtype", "float16 (with a GradScaler) needs CUDA; on cpu use bfloat16, float32")
        if self.dtype == "float16" and self.parallelism == "fsdp":
            # each shard would find its own overflows and skip steps, and scale, on its own
            raise ConfigError("dtype", "float16 needs parallelism=ddp (use bfloat16 with fsdp)")

    @property
    def device_type(self) -> str:
        """`cuda` or `cpu`: what `device` resolves to on this machine."""
        cuda = self.device == "cuda" or (self.device == "auto" and torch.cuda.is_available())
        return "cuda" if cuda else "cpu"


@dataclass
class Environment:
    """What the launcher told this process about its place in the job."""

    kind: str  # single | torchrun | slurm
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
        return out.stdout.split()[0]
    except (OSError, IndexError):
        return nodelist.split(",")[0]


def detect_environment(env: dict | None = None) -> Environment:
    """torchrun sets RANK/WORLD_SIZE; srun sets SLURM_PROCID/SLURM_NTASKS; otherwise a single process."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return Environment(
            "torchrun",
            int(env["RANK"]),
            int(env.get("LOCAL_RANK", 0)),
            int(env["WORLD_SIZE"]),
            env.get("MASTER_ADDR", "127.0.0.1"),
            int(env.get("MASTER_PORT", 29500)),
        )
    if "SLURM_STEP_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        job = int(env.get("SLURM_JOB_ID", "0"))
        return Environment(
            "slurm",
            int(env["SLURM_PROCID"]),
            int(env.get("SLURM_LOCALID", 0)),
            int(env["SLURM_NTASKS"]),
            _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
            20000 + job % 20000,
        )
    return Environment("single")


def micro_batch_size(batch_size: int, world_size: int, accumulation_steps: int) -> int:
    """Sequences per rank and micro-step, so that the global batch is exactly what the config says."""
    parts = world_size * accumulation_steps
    if batch_size % parts:
        raise ConfigError(
            "data.batch_size",
            f"{batch_size} does not divide by world size {world_size} x accumulation {accumulation_steps}",
        )
    return batch_size // parts


class Cluster:
    """Device, process group and model wrapping for the run; enter it before anything else."""

    def __init__(self, cfg: ClusterConfig):
        self.cfg = cfg
        self.env = detect_environment()
        self.rank, self.world_size = self.env.rank, self.env.world_size
        self.is_main = self.rank == 0
        use_cuda = cfg.device_type == "cuda"
        self.device = torch.device(f"cuda:{self.env.local_rank}" if use_cuda else "cpu")
        self.device_type = self.device.type
        self.fsdp = cfg.parallelism == "fsdp" and self.world_size > 1
        # float16 only (CUDA): scales the loss so small gradients do not flush to zero, skips overflowed
        # steps; disabled, its calls pass through. Its state is checkpointed with the run.
        self.grad_scaler = torch.amp.GradScaler(self.device_type, enabled=cfg.dtype == "float16")

    def __enter__(self) -> Cluster:
        torch.set_float32_matmul_precision(self.cfg.matmul_precision)
        if self.device_type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world_size > 1 and not dist.is_initialized():
            if self.env.kind == "slurm":
                os.environ.setdefault("MASTER_ADDR", self.env.master_addr)
                os.environ.setdefault("MASTER_PORT", str(self.env.master_port))
            backend = "nccl" if self.device_type == "cuda" else "gloo"
            dist.init_process_group(
                backend,
                rank=self.rank,
                world_size=self.world_size,
                device_id=self.device if backend == "nccl" else None,
            )
        return self

    def __exit__(self, *exc) -> None:
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.barrier()
            dist.destroy_process_group()

    def peak_flops(self) -> float:
        """One device's peak FLOP/s in the run's dtype (see flops.py); rank 0's, so that ranks measuring
        at once on one CPU do not slow each other down."""
        cfg, peak = self.cfg, 0.0
        if self.is_main or self.device_type == "cuda":
            peak = peak_flops(self.device, cfg.dtype, cfg.matmul_precision, cfg.peak_flops)
        if self.device_type == "cuda":
            return peak
        return self.all_reduce([peak], op="max")[0]

    def describe(self) -> str:
        return (
            f"host={socket.gethostname()} pid={os.getpid()} env={self.env.kind} "
            f"rank={self.rank}/{self.world_size} device={self.device}"
        )

    # ---- model ---------------------------------------------------------------------------------

    def wrap(self, model: nn.Module) -> nn.Module:
        """Move to device, shard (FSDP2, per block) or replicate (DDP), then compile in place.

        FSDP2's units are the blocks of every `nn.ModuleList` named `layers`, anywhere in the model (a VLM's
        `vision.layers` and `lm.layers` alike; nested lists first), then the root. DDP registers only the
        parameters that require grad now: freeze parts (`optim.freeze`) before wrapping.
        """
        model.to(self.device)
        if self.fsdp:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mp = None
            if self.cfg.dtype == "bfloat16" and self.device_type == "cuda":
                mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            kwargs = {"mp_policy": mp} if mp else {}
            lists = [
                (name.count("."), module)
                for name, module in model.named_modules()
                if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] == "layers"
            ]
            for _, blocks in sorted(lists, key=lambda item: -item[0]):  # stable: same depth in model order
                for block in blocks:
                    fully_shard(block, **kwargs)
            fully_shard(model, **kwargs)
        elif self.world_size > 1:
            ids = [self.device.index] if self.device_type == "cuda" else None
            # the only buffers are RoPE tables, identical everywhere: no need to re-send them each step
            model = DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
        if self.cfg.compile:
            model.compile()
        return model

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 or fp16 autocast, unless FSDP's mixed-precision policy already casts (GPU, bf16)."""
        if self.cfg.dtype == "float16":  # CUDA and DDP only (ClusterConfig.check)
            return torch.autocast(self.device_type, dtype=torch.float16)
        if self.cfg.dtype != "bfloat16" or (self.fsdp and self.device_type == "cuda"):
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=torch.bfloat16)

    @contextlib.contextmanager
    def gradient_sync(self, model: nn.Module, sync: bool) -> Iterator[None]:
        """Skip the gradient all-reduce on non-final accumulation micro-steps."""
        if sync or self.world_size == 1:
            yield
        elif self.fsdp:
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        else:
            with model.no_sync():
                yield

    @contextlib.contextmanager
    def gathered(self, model: nn.Module) -> Iterator[None]:
        """Whole parameters inside the block, for calls that bypass the wrapped model's forward (e.g. a
        VLM generating through its submodules): FSDP2 gathers a unit's shards only around its own forward,
        so the root's parameters would stay sharded. A no-op unless the model is sharded."""
        if not self.fsdp:
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for unit in units:
            unit.unshard()
        try:
            yield
        finally:
            for unit in units:
                unit.reshard()

    # ---- collectives ---------------------------------------------------------------------------

    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """Reduce a few python floats across ranks (one small collective)."""
        if self.world_size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
        return t.tolist()

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()


def wrappers(model: nn.Module) -> list[nn.Module]:
    """`model` and the modules it wraps, outermost first: DDP keeps the model in `.module` and
    `torch.compile(model)` in `._orig_mod`; FSDP2 and `model.compile()` leave it in place."""
    chain = [model]
    while True:
        if isinstance(chain[-1], (DistributedDataParallel, DataParallel)):
            chain.append(chain[-1].module)
        elif isinstance(getattr(chain[-1], "_orig_mod", None), nn.Module):
            chain.append(chain[-1]._orig_mod)
        else:
            return chain


def unwrap(model: nn.Module) -> nn.Module:
    """The module that holds the blocks."""
    return wrappers(model)[-1]
