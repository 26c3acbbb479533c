"""The float64 references of segkd.testing.reference against plain Python loops over tiny inputs.

The loops use only the ``math`` module, so they share nothing with the references (which use
torch.log_softmax, torch.std, ...): agreement means both transcribe the formula the same way.
"""

from __future__ import annotations

import math

import pytest
import torch

from segkd.testing.reference import (
    channel_kl_reference,
    cwd_loss_reference,
    hwd_curve_reference,
    hwd_loss_reference,
    hwd_weights_from_divergence_reference,
    hwd_weights_reference,
    spatial_softmax_reference,
)


def _softmax(values: list[float], tau: float) -> list[float]:
    top = max(values)
    exps = [math.exp((v - top) / tau) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def _rows(x: torch.Tensor) -> list[list[list[float]]]:
    """(N, C, *) tensor -> nested lists [n][c][i] of Python floats."""
    flat = x.reshape(x.shape[0], x.shape[1], -1).tolist()
    return [[[float(v) for v in row] for row in image] for image in flat]


def _loop_kl_sqdist(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> tuple[list[list[float]], ...]:
    kl, sq = [], []
    for s_img, t_img in zip(_rows(student), _rows(teacher), strict=True):
        kl_row, sq_row = [], []
        for s, t in zip(s_img, t_img, strict=True):
            p_s, p_t = _softmax(s, tau), _softmax(t, tau)
            kl_row.append(sum(pt * math.log(pt / ps) for ps, pt in zip(p_s, p_t, strict=True) if pt > 0))
            sq_row.append(sum((ps - pt) ** 2 for ps, pt in zip(p_s, p_t, strict=True)))
        kl.append(kl_row)
        sq.append(sq_row)
    return kl, sq


def _loop_weights(divergence: list[list[float]], mu: float, beta: float) -> list[list[float]]:
    out = []
    for row in divergence:
        channels = len(row)
        if channels == 1 or all(d == row[0] for d in row):
            z = [0.0] * channels
        else:
            mean = sum(row) / channels
            std = math.sqrt(sum((d - mean) ** 2 for d in row) / (channels - 1))
            z = [(d - mean) / std for d in row]
        g = [zi + mu if beta == 1 else (1 - beta ** (zi + mu)) / (1 - beta) for zi in z]
        top = max(g)
        exps = [math.exp(gi - top) for gi in g]
        out.append([channels * e / sum(exps) for e in exps])
    return out


SHAPES = [(1, 1, 1), (1, 1, 3), (2, 3, 5), (1, 4, 2, 3), (2, 2, 3, 1)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tau", [0.5, 1.0, 4.0])
def test_channel_kl_reference_matches_loops(shape: tuple[int, ...], tau: float) -> None:
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    teacher = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    kl, sqdist = channel_kl_reference(student, teacher, tau)
    loop_kl, loop_sq = _loop_kl_sqdist(student, teacher, tau)
    assert kl.dtype == sqdist.dtype == torch.float64
    assert kl.shape == sqdist.shape == shape[:2]
    torch.testing.assert_close(kl, torch.tensor(loop_kl, dtype=torch.float64), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(sqdist, torch.tensor(loop_sq, dtype=torch.float64), rtol=1e-12, atol=1e-14)


def test_spatial_softmax_reference_matches_loops() -> None:
    x = torch.tensor([[[1.0, -2.0, 0.5], [0.0, 0.0, 3.0]]])
    expected = [[_softmax([1.0, -2.0, 0.5], 2.0), _softmax([0.0, 0.0, 3.0], 2.0)]]
    torch.testing.assert_close(spatial_softmax_reference(x, 2.0), torch.tensor(expected, dtype=torch.float64))


def test_channel_kl_reference_handles_teacher_underflow() -> None:
    # p_T = 0 at some positions (0 * log 0 = 0) must not give NaN, even where p_S is tiny as well.
    student = torch.tensor([[[0.0, -800.0, 0.0]]], dtype=torch.float64)
    teacher = torch.tensor([[[0.0, -900.0, 5.0]]], dtype=torch.float64)
    kl, sqdist = channel_kl_reference(student, teacher, 1.0)
    loop_kl, loop_sq = _loop_kl_sqdist(student, teacher, 1.0)
    assert torch.isfinite(kl).all()
    torch.testing.assert_close(kl, torch.tensor(loop_kl, dtype=torch.float64))
    torch.testing.assert_close(sqdist, torch.tensor(loop_sq, dtype=torch.float64))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cwd_reference_matches_loops(reduction: str) -> None:
    gen = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(2, 3, 2, 3, generator=gen), torch.randn(2, 3, 2, 3, generator=gen)
    loop_kl, _ = _loop_kl_sqdist(student, teacher, 4.0)
    terms = [[16.0 * v for v in row] for row in loop_kl]
    expected = {
        "none": torch.tensor(terms, dtype=torch.float64),
        "sum": torch.tensor(sum(map(sum, terms)), dtype=torch.float64),
        "mean": torch.tensor(sum(map(sum, terms)) / 6, dtype=torch.float64),
    }[reduction]
    torch.testing.assert_close(cwd_loss_reference(student, teacher, 4.0, reduction), expected)


@pytest.mark.parametrize("beta", [0.1, 0.5, 1.0, 2.0])
def test_hwd_curve_reference_matches_formula(beta: float) -> None:
    xs = [-2.0, -0.3, 0.0, 0.7, 1.5]
    got = hwd_curve_reference(torch.tensor(xs), beta)
    expected = [x if beta == 1 else (1 - beta**x) / (1 - beta) for x in xs]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize(("mu", "beta"), [(0.0, 0.1), (1.0, 0.1), (0.1, 0.1), (-0.5, 1.0), (0.3, 3.0)])
def test_hwd_weights_from_divergence_reference_matches_loops(mu: float, beta: float) -> None:
    divergence = [[0.1, 0.4, 0.2, 0.9], [1.0, 1.0, 1.0, 1.0], [0.0, 2.0, 0.0, 0.0]]
    got = hwd_weights_from_divergence_reference(torch.tensor(divergence, dtype=torch.float64), mu, beta)
    torch.testing.assert_close(got, torch.tensor(_loop_weights(divergence, mu, beta), dtype=torch.float64))
    # The degenerate row is exactly uniform.
    assert got[1].tolist() == [1.0, 1.0, 1.0, 1.0]


def test_hwd_weights_reference_single_channel_is_one() -> None:
    gen = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(3, 1, 4, generator=gen), torch.randn(3, 1, 4, generator=gen)
    assert hwd_weights_reference(student, teacher).tolist() == [[1.0], [1.0], [1.0]]


@pytest.mark.parametrize("distance", ["prob", "logits"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_hwd_reference_matches_loops(distance: str, reduction: str) -> None:
    gen = torch.Generator().manual_seed(4)
    student, teacher = torch.randn(2, 4, 3, generator=gen) * 2, torch.randn(2, 4, 3, generator=gen) * 2
    tau, mu, beta = 2.0, 0.5, 0.1
    loop_kl, loop_sq = _loop_kl_sqdist(student, teacher, tau)
    if distance == "logits":
        loop_sq = [
            [sum((a - b) ** 2 for a, b in zip(s, t, strict=True)) for s, t in zip(s_img, t_img, strict=True)]
            for s_img, t_img in zip(_rows(student), _rows(teacher), strict=True)
        ]
    weights = _loop_weights(loop_sq, mu, beta)
    torch.testing.assert_close(
        hwd_weights_reference(student, teacher, tau, mu, beta, distance), torch.tensor(weights, dtype=torch.float64)
    )
    terms = [[tau * tau * w * k for w, k in zip(wr, kr, strict=True)] for wr, kr in zip(weights, loop_kl, strict=True)]
    total = sum(map(sum, terms))
    expected = {"none": terms, "sum": total, "mean": total / 8}[reduction]
    got = hwd_loss_reference(student, teacher, tau, mu, beta, distance, reduction)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))


def test_references_reject_bad_arguments() -> None:
    x = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="equal shapes"):
        channel_kl_reference(x, torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match="at least 3 dimensions"):
        channel_kl_reference(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="tau > 0"):
        channel_kl_reference(x, x, tau=0.0)
    with pytest.raises(ValueError, match="beta > 0"):
        hwd_curve_reference(x, beta=0.0)
    with pytest.raises(ValueError, match="reduction"):
        cwd_loss_reference(x, x, reduction="avg")
    with pytest.raises(ValueError, match="distance"):
        hwd_weights_reference(x, x, distance="l1")


def test_references_do_not_import_the_code_under_test() -> None:
    import ast
    import inspect

    import segkd.testing.reference as reference_package
    from segkd.testing.reference import channel_kl, cwd, hwd

    for module in (reference_package, channel_kl, cwd, hwd):
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{alias.name}" for alias in node.names]
            for name in names:
                assert name == "segkd.testing" or name.startswith(("segkd.testing.", "torch", "math", "__future__")), (
                    f"{module.__name__} imports {name}"
                )
