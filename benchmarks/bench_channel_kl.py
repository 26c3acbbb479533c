"""Benchmark of CWD and HWD forward+backward: the published eager formula, the same under
torch.compile, and segkd's channel_kl backends (torch; Triton on CUDA).

Not a test. Prints a table and, with ``--out``, writes every figure and the machine's description
as JSON. Columns:

* ``wall ms``: median wall-clock time of one forward+backward, host overhead included
  (``time.perf_counter`` around the call; on CUDA with a synchronize before and after; on CPU the
  implementations are timed in turn, interleaved, since a shared CPU drifts).
* ``peak MiB``: extra peak memory of one forward+backward above the inputs, the student's gradient
  included. CUDA: ``torch.cuda.max_memory_allocated``. CPU: growth of the process's resident set
  (RSS), sampled every ~0.2 ms by a thread, while glibc is told (``mallopt(M_MMAP_THRESHOLD, 64 KiB)``
  after a ``malloc_trim``) to map every block above 64 KiB on its own and unmap it when freed, so that
  RSS follows the live tensors; each CPU peak is measured in a fresh process (a clean heap, whatever ran
  before; two warm-up calls, then the smallest of three), the timings in the main process with a 32 MiB
  threshold, glibc's steady state.
* CUDA only: ``gpu ms`` (median time of one replay of a CUDA graph that captured forward+backward:
  no launch gaps), ``floor ms`` (3 passes over one input tensor, read student, read teacher, write
  the gradient, at the copy bandwidth measured here), ``x floor`` (gpu ms / floor ms) and
  ``kernels`` (CUDA kernels one forward+backward launches, counted by torch.profiler).
* ``rel err``: |loss - loss of segkd's torch backend| / |loss|, a sanity check.

Usage::

    python benchmarks/bench_channel_kl.py --device cpu --out cpu.json            # small shapes
    python benchmarks/bench_channel_kl.py --device cuda --shapes all --out gpu.json
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

SHAPES = {
    "all": [(8, 19, 64, 128), (8, 150, 64, 64), (8, 171, 64, 64), (16, 150, 128, 128)],
    "paper": [(8, 19, 64, 128), (8, 150, 64, 64), (8, 171, 64, 64)],
    "small": [(8, 19, 64, 128), (8, 150, 64, 64)],
    "tiny": [(2, 19, 32, 32)],
    # Rows whose length is not a multiple of 16 (Pascal VOC's 21 classes at 513x513 crops): the Triton kernels
    # cannot use vector loads there (docs/kernel.md, registers).
    "unaligned": [(8, 21, 65, 65)],
}
TAU, MU, BETA = 4.0, 0.0, 0.1


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--shapes", default=None, choices=sorted(SHAPES), help="default: all on CUDA, small on CPU")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16")
    parser.add_argument("--losses", default="cwd,hwd")
    parser.add_argument("--impls", default="eager,compile,segkd-torch,segkd-triton,segkd-triton-whole")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default: 50 CUDA, 5 CPU)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--memory-child", nargs=4, metavar=("LOSS", "IMPL", "SHAPE", "DTYPE"), help=argparse.SUPPRESS)
    return parser.parse_args()


# ------------------------------------------------------------------------------------------------
# The published formulas, written from the papers as eager PyTorch (softmax / log_softmax / multiply / sum).
# ------------------------------------------------------------------------------------------------


def eager_cwd(student: Any, teacher: Any, tau: float = TAU) -> Any:
    """CWD, Shu et al. ICCV 2021: tau^2 / (N C) sum_{n,c} KL(softmax(t/tau) || softmax(s/tau)) over H*W."""
    import torch.nn.functional as F

    n, c = student.shape[:2]
    s = student.reshape(n * c, -1) / tau
    t = teacher.detach().reshape(n * c, -1) / tau
    p_t = F.softmax(t, dim=1)
    kl = p_t * F.log_softmax(t, dim=1) - p_t * F.log_softmax(s, dim=1)
    return kl.sum() * tau**2 / (n * c)


def eager_hwd(student: Any, teacher: Any, tau: float = TAU, mu: float = MU, beta: float = BETA) -> Any:
    """HWD, Sun et al. ICME 2023: CWD with channel weights C softmax_c(g(z + mu)), z the standardised sq. distance."""
    import torch
    import torch.nn.functional as F

    n, c = student.shape[:2]
    s = student.reshape(n * c, -1) / tau
    t = teacher.detach().reshape(n * c, -1) / tau
    p_s = F.softmax(s, dim=1)
    p_t = F.softmax(t, dim=1)
    with torch.no_grad():
        d = (p_s - p_t).pow(2).sum(dim=1).view(n, c)
        z = (d - d.mean(dim=1, keepdim=True)) / d.std(dim=1, keepdim=True)
        g = (1 - beta ** (z + mu)) / (1 - beta)
        w = c * F.softmax(g, dim=1)
    kl = (p_t * (F.log_softmax(t, dim=1) - F.log_softmax(s, dim=1))).sum(dim=1).view(n, c)
    return (w * kl).sum() * tau**2 / (n * c)


def implementations(loss: str, device: str, names: list[str]) -> dict[str, Callable[[Any, Any], Any]]:
    import torch

    from segkd.losses.cwd import CWDLoss
    from segkd.losses.hwd import HWDLoss
    from segkd.ops.channel_kl import available_backends

    eager = eager_cwd if loss == "cwd" else eager_hwd
    impls: dict[str, Callable[[Any, Any], Any]] = {}
    for name in names:
        if name == "eager":
            impls[name] = eager
        elif name == "compile":
            impls[name] = torch.compile(eager, dynamic=False)
        elif name in ("segkd-torch", "segkd-triton", "segkd-triton-whole"):
            backend = name.split("-")[1]
            if backend == "triton" and (device != "cuda" or "triton" not in available_backends()):
                continue
            module = CWDLoss(TAU, backend=backend) if loss == "cwd" else HWDLoss(TAU, MU, BETA, backend=backend)  # type: ignore[arg-type]
            impls[name] = without_row_split(module) if name == "segkd-triton-whole" else module

        else:
            raise SystemExit(f"unknown implementation {name!r}")
    return impls


def without_row_split(fn: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """``fn`` with the Triton forward's row split switched off (one program per row block, any row count)."""
    from segkd.ops import _triton_backend

    def call(student: Any, teacher: Any) -> Any:
        saved = _triton_backend.SPLIT_ROWS
        _triton_backend.SPLIT_ROWS = False
        try:
            return fn(student, teacher)
        finally:
            _triton_backend.SPLIT_ROWS = saved

    return call


def splits_rows(shape: tuple[int, ...], device: str) -> bool:
    """Whether the Triton forward splits the rows of ``shape`` on ``device`` (else -whole is the same run)."""
    import torch

    from segkd.ops import _triton_backend

    rows, length = shape[0] * shape[1], shape[2] * shape[3]
    return _triton_backend.plan_segments(rows, length, torch.device(device))[0] > 1


# ------------------------------------------------------------------------------------------------
# Measurements
# ------------------------------------------------------------------------------------------------


_M_MMAP_THRESHOLD = -3


def _libc() -> Any:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


LIBC = _libc()


def set_mmap_threshold(num_bytes: int) -> bool:
    """Tell glibc to serve blocks above ``num_bytes`` by mmap (and unmap them when freed)."""
    if LIBC is None:
        return False
    LIBC.malloc_trim(0)
    return bool(LIBC.mallopt(_M_MMAP_THRESHOLD, num_bytes))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RSSPeak:
    """Samples the resident set size in a thread; ``peak - start`` is the growth during the block."""

    def __enter__(self) -> RSSPeak:
        self.start = _rss_bytes()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.0002)

    def __exit__(self, *exc: object) -> None:
        self.peak = max(self.peak, _rss_bytes())
        self._stop.set()
        self._thread.join()


def fwd_bwd(fn: Callable[[Any, Any], Any], student: Any, teacher: Any) -> Any:
    student.grad = None
    loss = fn(student, teacher)
    loss.backward()
    return loss


def time_cpu(impls: dict[str, Callable[[Any, Any], Any]], student: Any, teacher: Any, repeats: int) -> dict[str, float]:
    """Median wall-clock ms per implementation, the implementations interleaved (a shared CPU drifts)."""
    set_mmap_threshold(32 * 2**20)
    for fn in impls.values():
        for _ in range(2):
            fwd_bwd(fn, student, teacher)
    times: dict[str, list[float]] = {name: [] for name in impls}
    for _ in range(repeats):
        for name, fn in impls.items():
            t0 = time.perf_counter()
            fwd_bwd(fn, student, teacher)
            times[name].append(time.perf_counter() - t0)
    student.grad = None
    return {name: 1e3 * statistics.median(values) for name, values in times.items()}


def peak_cpu_mib(fn: Callable[[Any, Any], Any], student: Any, teacher: Any) -> float:
    """Smallest of three RSS growths over one forward+backward (gradient included)."""
    set_mmap_threshold(64 * 2**10)
    peaks = []
    for _ in range(3):
        student.grad = None
        if LIBC is not None:
            LIBC.malloc_trim(0)
        with RSSPeak() as rss:
            fwd_bwd(fn, student, teacher)
            student.grad = None  # the gradient was allocated inside the block: it counts
        peaks.append(rss.peak - rss.start)
    set_mmap_threshold(32 * 2**20)
    return min(peaks) / 2**20


def copy_bandwidth_gbs() -> float:
    import torch

    x = torch.empty(2**28, dtype=torch.uint8, device="cuda")  # 256 MiB
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / 20
    return 2 * x.numel() / seconds / 1e9


def measure_cuda(fn: Callable[[Any, Any], Any], student: Any, teacher: Any, repeats: int) -> dict[str, float]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fwd_bwd(fn, student, teacher)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()

    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fwd_bwd(fn, student, teacher)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)

    student.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd_bwd(fn, student, teacher)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fwd_bwd(fn, student, teacher)
        torch.cuda.synchronize()
    kernels = [
        e
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))
    ]

    gpu_ms = float("nan")
    try:
        student.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fwd_bwd(fn, student, teacher)
        graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        per_replay = []
        for _ in range(max(5, repeats // 5)):
            start.record()
            for _ in range(10):
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            per_replay.append(start.elapsed_time(end) / 10)
        gpu_ms = statistics.median(per_replay)
        del graph
    except Exception as error:  # a graph-unsafe implementation: report it, keep going
        print(f"    (CUDA graph capture failed: {type(error).__name__}: {error})", file=sys.stderr)
    student.grad = None
    return {
        "wall_ms": 1e3 * statistics.median(times),
        "peak_mib": peak / 2**20,
        "gpu_ms": gpu_ms,
        "kernels": len(kernels),
    }


# ------------------------------------------------------------------------------------------------


def machine(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": "unknown",
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def make_inputs(shape: tuple[int, ...], dtype: Any, device: str) -> tuple[Any, Any]:
    import torch

    gen = torch.Generator().manual_seed(0)
    student = torch.randn(shape, generator=gen).mul_(3).to(device=device, dtype=dtype)
    teacher = torch.randn(shape, generator=gen).mul_(3).to(device=device, dtype=dtype)
    return student.requires_grad_(), teacher


DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def memory_child(loss: str, impl: str, shape_text: str, dtype_name: str) -> None:
    """Print the CPU peak of one implementation, measured in this fresh process."""
    import torch

    fn = implementations(loss, "cpu", [impl])[impl]
    shape = tuple(int(v) for v in shape_text.split("x"))
    student, teacher = make_inputs(shape, getattr(torch, DTYPES[dtype_name]), "cpu")
    for _ in range(2):
        fwd_bwd(fn, student, teacher)
    print(peak_cpu_mib(fn, student, teacher))


def peak_cpu_subprocess(loss: str, impl: str, shape: tuple[int, ...], dtype_name: str) -> float:
    """CPU peak measured in a fresh process (a clean heap, whatever ran before)."""
    shape_text = "x".join(map(str, shape))
    command = [sys.executable, __file__, "--device", "cpu", "--memory-child", loss, impl, shape_text, dtype_name]
    done = subprocess.run(
        command, capture_output=True, text=True, check=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    )
    return float(done.stdout.strip().splitlines()[-1])


def write_json(path: str, info: dict[str, Any], results: list[dict[str, Any]]) -> None:
    with open(path, "w") as f:
        json.dump({"machine": info, "results": results}, f, indent=1)


def main() -> None:
    args = parse_args()
    import torch

    if args.memory_child:
        memory_child(*args.memory_child)
        return

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    shapes = SHAPES[args.shapes or ("all" if device == "cuda" else "small")]
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    repeats = args.repeats or (50 if device == "cuda" else 5)
    info = machine(device)
    info["cpu_memory_method"] = "RSS growth, glibc mmap threshold 64 KiB" if LIBC is not None else "RSS growth"
    if device == "cuda":
        info["copy_bandwidth_gbs"] = copy_bandwidth_gbs()
    print(json.dumps(info))

    columns = ["loss", "shape", "dtype", "impl", "wall ms", "peak MiB"]
    if device == "cuda":
        columns += ["gpu ms", "floor ms", "x floor", "kernels"]
    columns.append("rel err")
    print(" | ".join(columns))
    results = []
    for loss_name in args.losses.split(","):
        impls = implementations(loss_name, device, args.impls.split(","))
        for shape in shapes:
            for dtype_name in args.dtypes.split(","):
                dtype = dtypes[dtype_name]
                student, teacher = make_inputs(shape, dtype, device)
                with torch.no_grad():
                    reference = float(impls["segkd-torch"](student, teacher)) if "segkd-torch" in impls else None
                cpu_times = time_cpu(impls, student, teacher, repeats) if device == "cpu" else {}
                for impl_name, fn in impls.items():
                    if impl_name == "segkd-triton-whole" and not splits_rows(shape, device):
                        continue
                    if device == "cuda":
                        figures = measure_cuda(fn, student, teacher, repeats)
                        tensor_bytes = student.numel() * student.element_size()
                        floor_ms = 3 * tensor_bytes / (info["copy_bandwidth_gbs"] * 1e9) * 1e3
                        figures["floor_ms"] = floor_ms
                        figures["x_floor"] = figures["gpu_ms"] / floor_ms
                    else:
                        peak = peak_cpu_subprocess(loss_name, impl_name, shape, dtype_name)
                        figures = {"wall_ms": cpu_times[impl_name], "peak_mib": peak}
                    with torch.no_grad():
                        value = float(fn(student, teacher))
                    rel = abs(value - reference) / abs(reference) if reference else float("nan")
                    row = {
                        "loss": loss_name,
                        "shape": list(shape),
                        "dtype": dtype_name,
                        "impl": impl_name,
                        "device": device,
                        **figures,
                        "rel_err": rel,
                    }
                    results.append(row)
                    if args.out:  # rewritten after every row: a run cut short keeps what it measured
                        write_json(args.out, info, results)
                    cells = [loss_name, "x".join(map(str, shape)), dtype_name, impl_name]
                    cells += [f"{row['wall_ms']:.3f}", f"{row['peak_mib']:.1f}"]
                    if device == "cuda":
                        cells += [f"{row['gpu_ms']:.4f}", f"{row['floor_ms']:.4f}", f"{row['x_floor']:.2f}"]
                        cells.append(str(row["kernels"]))
                    cells.append(f"{rel:.1e}")
                    print(" | ".join(cells), flush=True)
                del student, teacher
    if args.out:
        write_json(args.out, info, results)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
