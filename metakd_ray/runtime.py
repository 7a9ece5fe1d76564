"""Where and how a stage computes: its device and its numeric precision (``compute.precision``).

``resolve_precision(requested, device_type)`` turns ``auto`` into a concrete precision:

* on a CPU with native bf16 (x86 ``avx512_bf16`` / ``amx_bf16``, Arm ``bf16``): ``bf16`` autocast; on other CPUs
  ``fp32`` (said once, in the log);
* on a CUDA device: ``bf16`` where the device supports it (Ampere and later), else ``fp16`` with a gradient scaler.

A :class:`Runtime` is a device plus a concrete precision: ``autocast()`` wraps forward passes and losses,
``scaler()`` is the gradient scaler (active for fp16 only), ``to_device(batch)`` moves a collated batch. Master
weights and optimiser state stay fp32 (autocast casts per op; nothing is converted in place); the losses compute in
fp32 whatever autocast is on (``losses.base.fp32``).

Which device a stage gets is decided by Ray: in a Tune trial or a Ray Data actor that holds a (fraction of a) GPU,
``CUDA_VISIBLE_DEVICES`` names it and :func:`current_device` returns ``cuda``; elsewhere ``cpu``.

A sweep driver without a GPU of its own cannot see what ``auto`` means on its cluster's GPUs: it asks one (a Ray task,
``raycluster.probe_gpu_bf16``) and records the answer in ``$METAKD_GPU_BF16`` (``1``/``0``), which
:func:`cuda_has_bf16` reads when no CUDA device is visible.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
import subprocess
from dataclasses import dataclass
from typing import Any

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CONCRETE = ("fp32", "bf16", "fp16")
GPU_BF16_ENV = "METAKD_GPU_BF16"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
log = logging.getLogger("metakd_ray.runtime")


class PrecisionUnresolved(RuntimeError):
    """``auto`` on a CUDA device that this process cannot see (and no ``$METAKD_GPU_BF16``)."""


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (x86: ``avx512_bf16`` or ``amx_bf16``; Arm: ``bf16``)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
        return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    except OSError:
        pass
    if platform.system() == "Darwin":  # Apple silicon M2 and later
        try:
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True,
                                 timeout=5)
            return out.stdout.strip() == "1"
        except (OSError, subprocess.SubprocessError):
            return False
    return False


def cuda_has_bf16() -> bool | None:
    """Whether the visible CUDA device supports bf16; from ``$METAKD_GPU_BF16`` when none is visible; else None."""
    if torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    env = os.environ.get(GPU_BF16_ENV)
    return None if env is None else env == "1"


@functools.cache
def _say_fallback() -> None:
    log.warning("compute.precision=auto: this CPU has no native bf16 (avx512_bf16, amx_bf16 or bf16); using fp32")


def resolve_precision(requested: str, device_type: str) -> str:
    """The concrete precision (``fp32``, ``bf16``, ``fp16``) that ``requested`` means on ``device_type``."""
    if requested not in PRECISIONS:
        raise ValueError(f"compute.precision: {requested!r} is not allowed; expected one of {', '.join(PRECISIONS)}")
    if requested != "auto":
        return requested
    if device_type == "cuda":
        bf16 = cuda_has_bf16()
        if bf16 is None:
            raise PrecisionUnresolved("compute.precision=auto for a GPU stage, but no GPU is visible here and "
                                      f"${GPU_BF16_ENV} is unset; run on the cluster or set compute.precision")
        return "bf16" if bf16 else "fp16"
    if cpu_has_bf16():
        return "bf16"
    _say_fallback()
    return "fp32"


STAGES = ("teacher", "cache", "trial")


def stage_device_type(cfg: Any, stage: str) -> str:
    """``cuda`` when the config gives ``stage`` (``teacher``, ``cache``, ``trial``) GPUs (``ray.use_gpu``), else
    ``cpu``."""
    return "cuda" if cfg.ray.gpus(stage) > 0 else "cpu"


def stage_precision(cfg: Any, stage: str) -> str:
    """The concrete precision ``stage`` computes in under ``cfg`` — resolved on this machine (a GPU stage: from
    this process's GPU or ``$METAKD_GPU_BF16``); ``auto`` where that cannot be known here (a dry run of a GPU sweep
    on a machine without one)."""
    try:
        return resolve_precision(cfg.compute.precision, stage_device_type(cfg, stage))
    except PrecisionUnresolved:
        return "auto"


def stage_precisions(cfg: Any) -> dict[str, str]:
    """``{stage: "<precision> on <device type>"}`` for every stage, for plans and manifests."""
    return {s: f"{stage_precision(cfg, s)} on {stage_device_type(cfg, s)}" for s in STAGES}


def current_device() -> torch.device:
    """``cuda`` when this process sees a GPU (Ray sets ``CUDA_VISIBLE_DEVICES`` to what it assigned), else ``cpu``."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


@dataclass(frozen=True)
class Runtime:
    """A device and a concrete precision (see the module docstring)."""

    device: torch.device = torch.device("cpu")
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.precision not in CONCRETE:
            raise ValueError(f"Runtime precision must be one of {', '.join(CONCRETE)}; got {self.precision!r} "
                             "(resolve 'auto' with resolve_precision first)")
        object.__setattr__(self, "device", torch.device(self.device))

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.precision]

    def autocast(self) -> Any:
        """Autocast to the precision's dtype on the device (a no-op context for fp32)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def scaler(self) -> torch.amp.GradScaler:
        """The gradient scaler: active for fp16 (whose gradients underflow without it), a pass-through otherwise."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def to_device(self, batch: dict) -> dict:
        """``batch`` with its tensors on the device (other values, e.g. ids, unchanged)."""
        if self.device.type == "cpu":
            return batch
        return {k: (v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                for k, v in batch.items()}

    def describe(self) -> str:
        return f"{self.precision} on {self.device.type}"


CPU_FP32 = Runtime()


def runtime_for(requested: str, device: str | torch.device | None = None) -> Runtime:
    """The runtime of a stage running here: ``device`` (default :func:`current_device`) and ``requested`` resolved
    for it."""
    dev = torch.device(device) if device is not None else current_device()
    return Runtime(dev, resolve_precision(requested, dev.type))


@functools.cache
def _libc() -> Any:
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release_memory(collect: bool = False) -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere). PyTorch frees a training
    step's activations into glibc's heap, which keeps them: without this, a trial's RSS grew by ~1.3 GB over an
    epoch of 1,631 examples and stayed there (benchmarks/memory.py). Called after every epoch and trial.
    ``collect``: first free what only reference cycles keep alive (``gc.collect``): a reused trial actor's previous
    student, optimiser and cache stay in cycles until Python's collector happens to run, which held 1-2 GB more
    for ~20 s at the start of each trial of a reused actor (benchmarks/memory.py, scarcity wave)."""
    if collect:
        import gc

        gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
