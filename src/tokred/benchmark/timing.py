"""The timing protocol shared by ``tokred-benchmark`` and ``tokred-report``.

What one number means:

* **throughput** (img/s): ``batch_size`` random images per forward pass, ``model.eval()`` under
  ``torch.inference_mode`` (and autocast for bf16/fp16). After ``warmup`` untimed passes, each of ``repeats`` rounds
  times ``iters`` back-to-back passes (CUDA synchronised before and after); the figure is ``batch_size`` divided by
  the median per-pass time. ``throughput_iqr_pct`` is the interquartile range of the rounds relative to the median:
  a noisy machine shows up there instead of silently skewing a speed-up.
* **interleaving**: all models of one comparison are timed round-robin (round k times every model once, the order
  reversed on odd rounds), so the baseline and every reducer see the same machine state and drift cancels out. This
  is why speed-ups are only comparable inside one run.
* **latency** (ms): the same protocol at batch 1, ``latency_repeats`` rounds of ``latency_iters`` passes.
* **peak memory** (MB): the memory one forward pass at ``batch_size`` needs *on top of* what is already held before it
  (weights, input), taken on the last warm-up pass. CUDA: ``max_memory_allocated`` minus ``memory_allocated`` before
  the pass. CPU (Linux): the rise of the process's peak resident set (``VmHWM``, reset through
  ``/proc/self/clear_refs``) above its resident set before the pass, after ``malloc_trim`` has returned freed heap
  pages; it includes allocator slack, so compare CPU figures only with CPU figures. ``None`` where neither exists.
* **training throughput** (img/s): one optimiser step per pass at ``train_batch_size``, as the method trains: forward
  and loss terms in train mode (under autocast for bf16/fp16, compiled with ``compile``; no gradient scaler), backward
  of their sum, AdamW step. The same warm-up, interleaved rounds, synchronisation and median as inference, in a pass of
  its own after it (``train_batch_size: null`` skips it).
"""

from __future__ import annotations

import contextlib
import ctypes
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from tokred.export import onnx_session

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
RUNTIMES = ("torch", "onnxruntime")


@dataclass(frozen=True)
class SpeedSettings:
    """How models are timed; every field is a key of ``conf/benchmark.yaml`` and a ``tokred-report`` option."""

    batch_size: int = 64
    precision: str = "fp32"
    compile: bool = False
    device: str = "auto"
    threads: int | None = None
    warmup: int = 1
    repeats: int = 9
    iters: int = 1
    latency_repeats: int = 10
    latency_iters: int = 1
    train_batch_size: int | None = None  # None: no training step is timed (tokred-report times exported models)
    runtime: str = "torch"  # torch (eager, or compiled with compile=true) | onnxruntime (the ONNX export, CPU)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}; choose one of: {', '.join(PRECISIONS)}")
        for name in ("batch_size", "warmup", "repeats", "iters", "latency_iters"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.train_batch_size is not None and self.train_batch_size < 1:
            raise ValueError(f"train_batch_size={self.train_batch_size} must be >= 1 (null: no training step)")
        if self.latency_repeats < 0:
            raise ValueError(f"latency_repeats={self.latency_repeats} must be >= 0 (0 skips batch-1 latency)")
        if self.compile and self.warmup < 2:
            # The first pass compiles; the last warm-up pass measures peak memory and must not include compilation.
            raise ValueError(f"compile=true needs warmup >= 2 (got {self.warmup}): the first pass compiles")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads={self.threads} must be >= 1, or null for torch's default")
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime={self.runtime!r}; choose one of: {', '.join(RUNTIMES)}")
        if self.runtime == "onnxruntime":
            # The ONNX rows time the exported fp32 graph on onnxruntime's CPU provider, inference only: autocast,
            # torch.compile and the training step are torch's and have no meaning there.
            wrong = {
                "precision=fp32": self.precision != "fp32",
                "compile=false": self.compile,
                "device=cpu": self.device not in ("cpu", "auto"),
                "train_batch_size=null": self.train_batch_size is not None,
            }
            if any(wrong.values()):
                raise ValueError(
                    "runtime=onnxruntime times the fp32 ONNX export on the CPU, inference only; add "
                    + " ".join(k for k, bad in wrong.items() if bad)
                )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> SpeedSettings:
        """The settings among ``values`` (a composed config or parsed options); other keys are ignored."""
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Speed:
    throughput: float
    throughput_iqr_pct: float
    latency_ms: float | None
    peak_mem_mb: float | None


@dataclass(frozen=True)
class TrainSpeed:
    throughput: float
    throughput_iqr_pct: float


def setup(settings: SpeedSettings) -> torch.device:
    """Apply ``settings.threads`` (before :func:`machine_info` records the count) and resolve the device."""
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    return resolve_device(settings.device)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name} but torch sees no CUDA device; use device=cpu or device=auto")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device={name}: the harness times cpu and cuda devices; use device=cpu, cuda or auto")
    return device


def _cpu_name() -> str:
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    except OSError:
        match = None
    return match.group(1).strip() if match else (platform.processor() or platform.machine())


def machine_info(device: torch.device) -> dict[str, Any]:
    """What every result row records about where it was measured."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        slug = f"cuda-{name}"
    else:
        name = _cpu_name()
        slug = f"cpu-{name}-{torch.get_num_threads()}t"
    return {
        "machine": re.sub(r"[^a-z0-9]+", "-", slug.lower()).strip("-"),
        "device": device.type,
        "device_name": name,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "cuda": torch.version.cuda or "",
        "python": platform.python_version(),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


@contextlib.contextmanager
def _inference(device: torch.device, precision: str) -> Iterator[None]:
    with torch.inference_mode(), _autocast(device, precision):
        yield


def _seconds_per_pass(run: Callable[[], Any], iters: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        run()
    _sync(device)
    return (time.perf_counter() - start) / iters


def _interleaved(
    passes: Mapping[str, Callable[[], Any]],
    repeats: int,
    iters: int,
    device: torch.device,
    tick: Callable[[str], None],
) -> dict[str, list[float]]:
    """Seconds per pass of every ``passes`` entry in each of ``repeats`` round-robin rounds (odd rounds reversed)."""
    names = list(passes)
    rounds: dict[str, list[float]] = {n: [] for n in names}
    for k in range(repeats):
        for name in names if k % 2 == 0 else reversed(names):
            rounds[name].append(_seconds_per_pass(passes[name], iters, device))
            tick(name)
    return rounds


def _proc_status_kb(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE).group(1))


def _cpu_peak_rise_mb(run: Callable[[], None]) -> float | None:
    """Rise of the peak resident set during ``run`` (Linux only; see the module docstring)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed heap pages, else earlier passes hide this one's peak
        Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM to the current resident set
        before = _proc_status_kb("VmRSS")
    except (OSError, AttributeError):
        run()  # not Linux/glibc: still the warm-up pass it stands in for, just without a memory figure
        return None
    run()
    return (_proc_status_kb("VmHWM") - before) / 1024


def _peak_memory_mb(run: Callable[[], None], device: torch.device) -> float | None:
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    return _cpu_peak_rise_mb(run)


def _iqr_pct(samples: list[float]) -> float:
    if len(samples) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return 100 * (q3 - q1) / statistics.median(samples)


def prepare(model: nn.Module, settings: SpeedSettings, device: torch.device) -> Callable[[torch.Tensor], Any]:
    """Eval mode on ``device``, compiled if asked (compilation then happens during the warm-up passes), or with
    ``runtime=onnxruntime`` exported to ONNX and run by an onnxruntime session at torch's thread count."""
    model = model.eval().to(device)
    if settings.runtime == "onnxruntime":
        if device.type != "cpu":
            raise ValueError(f"runtime=onnxruntime runs on the CPU, not {device}; add device=cpu")
        return onnx_session(model, int(model.vit.patch_embed.img_size[0]))  # OnnxExportError names what is missing
    return torch.compile(model) if settings.compile else model


def measure_speed(
    models: Mapping[str, tuple[Callable[[torch.Tensor], Any], int]],
    settings: SpeedSettings,
    device: torch.device,
    tick: Callable[[str], None] = lambda name: None,
) -> dict[str, Speed]:
    """Time ``{name: (prepared model, img_size)}`` interleaved; ``tick(name)`` is called after each timed step.

    ``settings.threads`` is applied by :func:`setup`, which also gives ``device``.
    Steps per model: ``warmup`` + ``repeats`` (+ 1 + ``latency_repeats`` when latency is measured).
    """
    inputs: dict[tuple[int, int], torch.Tensor] = {}

    def batch(size: int, img_size: int) -> torch.Tensor:
        if (size, img_size) not in inputs:
            inputs[size, img_size] = torch.randn(size, 3, img_size, img_size, device=device)
        return inputs[size, img_size]

    names = list(models)
    memory: dict[str, float | None] = {}
    latency: dict[str, list[float]] = {n: [] for n in names}

    def passes(size: int) -> dict[str, Callable[[], Any]]:
        return {name: partial(model, batch(size, img)) for name, (model, img) in models.items()}

    with _inference(device, settings.precision):
        for name, run in passes(settings.batch_size).items():
            for _ in range(settings.warmup - 1):
                run()
                tick(name)
            memory[name] = _peak_memory_mb(run, device)
            tick(name)
        rounds = _interleaved(passes(settings.batch_size), settings.repeats, settings.iters, device, tick)
        if settings.latency_repeats:
            for name, run in passes(1).items():  # batch 1 is a new shape: one untimed pass (a recompile if compiled)
                run()
                tick(name)
            latency = _interleaved(passes(1), settings.latency_repeats, settings.latency_iters, device, tick)
    return {
        name: Speed(
            throughput=settings.batch_size / statistics.median(rounds[name]),
            throughput_iqr_pct=_iqr_pct(rounds[name]),
            latency_ms=1000 * statistics.median(latency[name]) if latency[name] else None,
            peak_mem_mb=memory[name],
        )
        for name in names
    }


def steps_per_model(settings: SpeedSettings) -> int:
    """How many times :func:`measure_speed` ticks per model (for progress bars)."""
    return settings.warmup + settings.repeats + (1 + settings.latency_repeats if settings.latency_repeats else 0)


def train_step(
    loss_terms: Callable[[torch.Tensor], Mapping[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    settings: SpeedSettings,
    device: torch.device,
) -> Callable[[torch.Tensor], None]:
    """One optimiser step on a batch of images: ``loss_terms(images)`` (the model's named loss terms, in train mode)
    under autocast as configured and compiled with ``compile``, backward of their sum, ``optimizer.step()``."""
    terms_of = torch.compile(loss_terms) if settings.compile else loss_terms

    def step(images: torch.Tensor) -> None:
        with _autocast(device, settings.precision):  # backward outside autocast, as torch's AMP recipe has it
            loss = torch.stack([t.float() for t in terms_of(images).values()]).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # gradients are not held between steps, as in a training loop

    return step


def measure_train_speed(
    steps: Mapping[str, tuple[Callable[[torch.Tensor], None], int]],
    settings: SpeedSettings,
    device: torch.device,
    tick: Callable[[str], None] = lambda name: None,
) -> dict[str, TrainSpeed]:
    """Time ``{name: (train_step(...), img_size)}`` interleaved at ``settings.train_batch_size``, like
    :func:`measure_speed`: ``warmup`` untimed steps each, then ``repeats`` rounds of ``iters`` steps."""
    size = settings.train_batch_size
    inputs = {img: torch.randn(size, 3, img, img, device=device) for img in {img for _, img in steps.values()}}
    passes = {name: partial(step, inputs[img]) for name, (step, img) in steps.items()}
    for name, run in passes.items():
        for _ in range(settings.warmup):
            run()
            tick(name)
    rounds = _interleaved(passes, settings.repeats, settings.iters, device, tick)
    return {name: TrainSpeed(size / statistics.median(rounds[name]), _iqr_pct(rounds[name])) for name in passes}


def train_steps_per_model(settings: SpeedSettings) -> int:
    """How many times :func:`measure_train_speed` ticks per model (0: the training step is not timed)."""
    return 0 if settings.train_batch_size is None else settings.warmup + settings.repeats
