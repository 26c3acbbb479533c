"""Benchmark of CIRKD's relational terms on CPU: peak memory and time, blocked (segkd) against unblocked.

Not a test. ``unblocked`` is segkd's code before the blocks (all ``(B, B, L, L)`` mini-batch
similarities, or all ``V x M`` memory logits, at once, plain autograd), copied here (without the
argument checks); ``blocked`` is
:func:`segkd.losses.cirkd.cirkd_minibatch_loss` / :func:`~segkd.losses.cirkd.cirkd_memory_kl` with
``block_size=None`` (256 MiB of temporaries) and with a small ``block_size``. Columns:

* ``peak MiB``: growth of the resident set over one forward+backward, the student's gradient included,
  measured in a fresh process per case (RSS sampled every ~0.2 ms by a thread, glibc told to map and
  unmap every block above 64 KiB on its own so that RSS follows the live tensors; one warm-up, then
  the smallest of three). The inputs are allocated before and do not count.
* ``ms``: median wall-clock of one forward+backward in the main process (glibc's default allocation
  settings), the implementations interleaved (a shared CPU drifts).
* ``max |d|``: largest difference of loss and gradient to ``unblocked``, relative to its largest value.

Shapes (CIRKD): per-GPU batch 2 or 4; features at stride 8 of a 512 x 512 crop (64 x 64) and of twice
the crop (128 x 128); teacher 256, student 128 channels; mini-batch term after ``pool=2``; memory term
at full resolution with ADE20K's 150 classes (``4096 // 150 + 1 = 28`` pixel and ``1024 // 150 + 1 = 7``
region entries per class: 4200 and 1050), every pixel an anchor.

Usage::

    python benchmarks/bench_cirkd_memory.py                # all cases: over 30 min on 2 cores, ~5 GB (mb-4-128)
    python benchmarks/bench_cirkd_memory.py --cases mb-2-64 mem-2-64 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from bench_channel_kl import LIBC, RSSPeak, machine, set_mmap_threshold

TEACHER_CHANNELS, STUDENT_CHANNELS, POOL, TAU = 256, 128, 2, 0.1
CLASSES, PIXEL_ENTRIES, REGION_ENTRIES = 150, 150 * 28, 150 * 7
SMALL_BLOCK = 256
# name: (term, batch, side)
CASES = {
    "mb-2-64": ("minibatch", 2, 64),
    "mb-4-64": ("minibatch", 4, 64),
    "mb-2-128": ("minibatch", 2, 128),
    "mb-4-128": ("minibatch", 4, 128),
    "mem-2-64": ("memory", 2, 64),
    "mem-2-128": ("memory", 2, 128),
}
IMPLS = ["unblocked", "blocked", f"blocked-{SMALL_BLOCK}"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=5, help="timed forward+backward per implementation")
    parser.add_argument("--out", default=None, help="write the figures as JSON")
    parser.add_argument("--memory-child", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    return parser.parse_args()


def unblocked_minibatch(student: Any, teacher: Any) -> Any:
    """segkd's mini-batch loss before blocking (pool, unit vectors, all pairs at once)."""
    import torch
    import torch.nn.functional as F

    from segkd.losses._vectors import unit_vectors

    student = F.avg_pool2d(student, POOL, stride=POOL, ceil_mode=True)
    teacher = F.avg_pool2d(teacher.detach(), POOL, stride=POOL, ceil_mode=True)

    def similarities(feat: Any) -> Any:
        unit = unit_vectors(feat.flatten(2))
        return torch.matmul(unit.transpose(1, 2).unsqueeze(1), unit.unsqueeze(0)) / TAU

    with torch.no_grad():
        log_p_t = F.log_softmax(similarities(teacher), dim=-1)
        p_t = log_p_t.exp()
        neg_entropy = torch.einsum("...i,...i->...", p_t, log_p_t)
    kl = (neg_entropy - torch.einsum("...i,...i->...", p_t, F.log_softmax(similarities(student), dim=-1))).clamp_min(0)
    return kl.mean(dim=-1).mean()


def unblocked_memory(student: Any, teacher: Any, entries: Any) -> Any:
    """segkd's memory pixel-to-pixel term before blocking (every pixel an anchor, ``kd_tau = 1``)."""
    import torch
    import torch.nn.functional as F

    from segkd.losses._vectors import unit_vectors

    dim = student.shape[1]
    s = unit_vectors(student).permute(0, 2, 3, 1).reshape(-1, dim)
    t = F.normalize(teacher.detach(), dim=1).permute(0, 2, 3, 1).reshape(-1, dim)
    with torch.no_grad():
        log_p_t = F.log_softmax(t @ entries.t() / TAU, dim=-1)
        p_t = log_p_t.exp()
        neg_entropy = torch.einsum("...i,...i->...", p_t, log_p_t)
    kl = (neg_entropy - torch.einsum("...i,...i->...", p_t, F.log_softmax(s @ entries.t() / TAU, dim=-1))).clamp_min(0)
    return kl.mean()


def make_case(case: str) -> tuple[Any, dict[str, Callable[[], Any]]]:
    """The student input (requires grad) and one zero-argument forward per implementation."""
    import torch
    import torch.nn.functional as F

    from segkd.losses.cirkd import cirkd_memory_kl, cirkd_minibatch_loss

    term, batch, side = CASES[case]
    gen = torch.Generator().manual_seed(0)
    if term == "minibatch":
        student = torch.randn(batch, STUDENT_CHANNELS, side, side, generator=gen).requires_grad_()
        teacher = torch.randn(batch, TEACHER_CHANNELS, side, side, generator=gen)

        def blocked(block: int | None) -> Callable[[], Any]:
            return lambda: cirkd_minibatch_loss(student, teacher, TAU, POOL, block_size=block)

        impls = {"unblocked": lambda: unblocked_minibatch(student, teacher)}
    else:
        student = torch.randn(batch, TEACHER_CHANNELS, side, side, generator=gen).requires_grad_()
        teacher = torch.randn(batch, TEACHER_CHANNELS, side, side, generator=gen)
        labels = torch.zeros(batch, side, side, dtype=torch.long)
        pixels = F.normalize(torch.randn(PIXEL_ENTRIES, TEACHER_CHANNELS, generator=gen), dim=1)
        regions = F.normalize(torch.randn(REGION_ENTRIES, TEACHER_CHANNELS, generator=gen), dim=1)

        def blocked(block: int | None) -> Callable[[], Any]:
            return lambda: cirkd_memory_kl(student, teacher, labels, pixels, regions, TAU, block_size=block)[0]

        impls = {"unblocked": lambda: unblocked_memory(student, teacher, pixels)}
    impls["blocked"] = blocked(None)
    impls[f"blocked-{SMALL_BLOCK}"] = blocked(SMALL_BLOCK)
    return student, impls


def fwd_bwd(fn: Callable[[], Any], student: Any) -> tuple[float, Any]:
    student.grad = None
    loss = fn()
    loss.backward()
    return loss.item(), student.grad


def memory_child(case: str, impl: str) -> None:
    """Print the smallest RSS growth (MiB) of three forward+backward passes, in this fresh process."""
    student, impls = make_case(case)
    fn = impls[impl]
    set_mmap_threshold(64 * 2**10)
    fwd_bwd(fn, student)
    peaks = []
    for _ in range(3):
        student.grad = None
        if LIBC is not None:
            LIBC.malloc_trim(0)
        with RSSPeak() as rss:
            fwd_bwd(fn, student)
            student.grad = None  # allocated inside the block: it counts
        peaks.append(rss.peak - rss.start)
    print(min(peaks) / 2**20)


def peak_mib(case: str, impl: str) -> float:
    command = [sys.executable, __file__, "--memory-child", case, impl]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return float(done.stdout.strip().splitlines()[-1])


def time_and_check(case: str, repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median ms per implementation (interleaved) and the largest relative difference to ``unblocked``."""
    student, impls = make_case(case)  # glibc's default allocation settings
    loss, grad = fwd_bwd(impls["unblocked"], student)
    scale = max(abs(loss), grad.abs().max().item())
    diffs = {}
    for name, fn in impls.items():
        other_loss, other_grad = fwd_bwd(fn, student)
        diffs[name] = max(abs(other_loss - loss), (other_grad - grad).abs().max().item()) / scale
    times: dict[str, list[float]] = {name: [] for name in impls}
    for _ in range(repeats):
        for name, fn in impls.items():
            start = time.perf_counter()
            fwd_bwd(fn, student)
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(values) for name, values in times.items()}, diffs


def main() -> None:
    args = parse_args()
    if args.memory_child:
        memory_child(*args.memory_child)
        return
    import torch

    info = machine("cpu")
    info["cpu_memory_method"] = "RSS growth in a fresh process, glibc mmap threshold 64 KiB"
    print(f"# {info['cpu']}, {info['cpu_threads']} threads, torch {info['torch']}, fp32")
    print(f"{'case':<10} {'term':<9} {'B':>2} {'h=w':>4} {'impl':<12} {'peak MiB':>9} {'ms':>8} {'max |d|':>8}")
    results = []
    for case in args.cases:
        term, batch, side = CASES[case]
        times, diffs = time_and_check(case, args.repeats)
        for impl in IMPLS:
            peak = peak_mib(case, impl)
            row = {"case": case, "term": term, "batch": batch, "side": side, "impl": impl, "peak_mib": peak}
            row |= {"ms": times[impl], "max_rel_diff": diffs[impl]}
            results.append(row)
            print(
                f"{case:<10} {term:<9} {batch:>2} {side:>4} {impl:<12} {peak:>9.0f} {times[impl]:>8.0f} "
                f"{diffs[impl]:>8.1e}",
                flush=True,
            )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": info, "torch_threads": torch.get_num_threads(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
