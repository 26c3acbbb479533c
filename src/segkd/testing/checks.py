r"""``check_distillation_loss``: the battery of checks every segkd loss passes, for your own losses too.

The bugs that cost distillation researchers weeks are gradient bugs: a teacher that receives a
gradient, a weight that should be detached and is not, a NaN for degenerate inputs, a loss that is
not invariant where its formula says it is. :func:`check_distillation_loss` runs, on small generated
inputs, the checks segkd runs on its own losses and raises a :class:`LossCheckError` (an
``AssertionError``, so pytest shows it as a plain test failure) naming the property that failed, the
shapes, and the largest difference it found.

Every evaluation of a module works on a fresh ``copy.deepcopy`` of it, right after
``torch.manual_seed(seed)``. Internal randomness (MGD's masks, a module's own ``torch.Generator``)
is therefore the same in every evaluation, and internal state (memory queues, running statistics)
is never changed on the object you pass in. The caller's global random state is restored on exit.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.gradcheck import GradcheckError

from segkd import _checks

__all__ = [
    "DECLARATION_ATTRIBUTE",
    "PROPERTIES",
    "CheckReport",
    "LossCheckError",
    "LossDeclaration",
    "check_distillation_loss",
    "declared_checks",
]

#: Every property :func:`check_distillation_loss` can check, in the order it checks them.
PROPERTIES = (
    "output",
    "inputs_unchanged",
    "deterministic",
    "gradcheck",
    "finite",
    "teacher_grad",
    "teacher_graph",
    "zero_at_equal",
    "channel_shift_invariant",
    "pixel_shift_invariant",
    "reference",
    "reference_gradient",
    "state_dict",
)

LossFn = Callable[..., Any]

# torch.autograd.gradcheck's defaults, spelled out: central differences with this step, and
# |analytical - numerical| <= atol + rtol * |numerical| element-wise.
_GRADCHECK_EPS = 1e-6
_GRADCHECK_ATOL = 1e-5
_GRADCHECK_RTOL = 1e-3


#: The attribute through which a loss declares what :func:`check_distillation_loss` needs to know about it.
DECLARATION_ATTRIBUTE = "distillation_checks"


@dataclass(frozen=True)
class LossDeclaration:
    """What a loss declares about itself for :func:`check_distillation_loss`: the declaration protocol.

    A loss (an ``nn.Module`` or a function) declares through an attribute named ``distillation_checks``
    (:data:`DECLARATION_ATTRIBUTE`) holding a :class:`LossDeclaration`, a mapping of its field names,
    or a callable without arguments that returns one of them (a method, so that the declaration
    follows the module's settings: its ``reference`` uses the same ``tau``). Every segkd loss
    declares; fields left at their defaults declare nothing. An argument given to
    :func:`check_distillation_loss` overrides the declared value.

    Attributes:
        zero_at_equal: the loss and its gradient vanish at ``student == teacher`` (checked only when
            the teacher has the student's shape).
        channel_shift_invariant: invariance to a per-channel constant.
        pixel_shift_invariant: invariance to a per-pixel constant shared by all channels.
        reference: an independent implementation with the loss's settings, taking the same arguments.
        exact_gradient: ``False`` when part of the value is detached on purpose (HWD's weights):
            ``gradcheck`` is skipped and the gradient is compared with ``reference``'s instead.
        with_labels: the loss takes a label map as third argument.
        num_classes: the number of classes of the generated labels.
        ignore_index: the label of ignored pixels.
        teacher_channels: the teacher's channel count when the loss fixes it (MGD, CIRKD's memory):
            the teacher is generated with the student's shape but this many channels.
    """

    zero_at_equal: bool = False
    channel_shift_invariant: bool = False
    pixel_shift_invariant: bool = False
    reference: LossFn | None = None
    exact_gradient: bool = True
    with_labels: bool = False
    num_classes: int | None = None
    ignore_index: int = 255
    teacher_channels: int | None = None


def declared_checks(loss: Any) -> LossDeclaration:
    """The :class:`LossDeclaration` of ``loss`` (an empty one when it declares nothing).

    Raises:
        TypeError: ``distillation_checks`` is neither a declaration, a mapping, nor a callable returning one.
    """
    declared = getattr(loss, DECLARATION_ATTRIBUTE, None)
    if callable(declared) and not isinstance(declared, (LossDeclaration, Mapping)):
        declared = declared()
    if declared is None:
        return LossDeclaration()
    if isinstance(declared, Mapping):
        return LossDeclaration(**declared)
    if not isinstance(declared, LossDeclaration):
        raise TypeError(
            f"Expected `loss.{DECLARATION_ATTRIBUTE}` to be a LossDeclaration, a mapping of its fields, or a "
            f"callable returning one, got {type(declared).__name__}."
        )
    return declared


class LossCheckError(AssertionError):
    """A distillation loss failed one property of :func:`check_distillation_loss`.

    Attributes:
        property_name: the failed property, one of :data:`PROPERTIES`.
        largest_difference: the largest difference found (``nan`` where it is not a number,
            e.g. the loss raised).
    """

    def __init__(self, message: str, property_name: str, largest_difference: float) -> None:
        super().__init__(message)
        self.property_name = property_name
        self.largest_difference = largest_difference


@dataclass(frozen=True)
class CheckReport:
    """What :func:`check_distillation_loss` checked: every property in ``passed`` held.

    Attributes:
        passed: the properties that ran and held, in the order they ran.
        skipped: property name to the reason it did not run (not declared, not a module, ...).
        student_shape: shape of the generated student inputs.
        teacher_shape: shape of the generated teacher inputs.
        label_shape: shape of the generated label maps, or ``None`` without labels.
    """

    passed: tuple[str, ...]
    skipped: Mapping[str, str] = field(default_factory=dict)
    student_shape: tuple[int, ...] = ()
    teacher_shape: tuple[int, ...] = ()
    label_shape: tuple[int, ...] | None = None

    def __str__(self) -> str:
        lines = [f"passed: {', '.join(self.passed)}"]
        lines += [f"skipped {name}: {reason}" for name, reason in self.skipped.items()]
        return "\n".join(lines)


def _max_abs(x: Tensor) -> float:
    if x.numel() == 0:
        return 0.0
    x = x.detach().to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        return math.inf
    return float(x.abs().max())


def _max_mismatch(actual: Tensor, expected: Tensor, atol: float, rtol: float) -> tuple[float, bool]:
    """Largest ``|actual - expected|`` and whether every element is within ``atol + rtol * |expected|``."""
    a = actual.detach().to(torch.float64)
    b = expected.detach().to(torch.float64).to(a.device)
    if a.numel() == 0:
        return 0.0, True
    diff = (a - b).abs()
    both_nan = torch.isnan(a) & torch.isnan(b)
    diff = torch.where(both_nan | (a == b), torch.zeros_like(diff), diff)  # equal infinities differ by 0
    bad_values = torch.isnan(diff)
    largest = math.inf if bool(bad_values.any()) else float(diff.max())
    ok = bool((diff <= atol + rtol * b.abs()).all()) and not bool(bad_values.any())
    return largest, ok


class _Battery:
    """The generated inputs, the settings and one method per property."""

    def __init__(
        self,
        loss: LossFn,
        student_shape: tuple[int, ...],
        teacher_shape: tuple[int, ...],
        label_shape: tuple[int, ...] | None,
        num_classes: int | None,
        ignore_index: int,
        atol: float,
        rtol: float,
        seed: int,
        device: torch.device,
        dtype: torch.dtype,
        scales: tuple[float, ...],
        fast_gradcheck: bool,
    ) -> None:
        self.loss = loss
        self.scales = scales
        self.fast_gradcheck = fast_gradcheck
        self.student_shape = student_shape
        self.teacher_shape = teacher_shape
        self.label_shape = label_shape
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.atol = atol
        self.rtol = rtol
        self.seed = seed
        self.device = device
        self.dtype = dtype
        self._cast_cache: dict[torch.dtype, LossFn] = {}

    # ----------------------------------------------------------------------------- failures
    def _where(self) -> str:
        where = f"student {_checks.shape_str(self.student_shape)}, teacher {_checks.shape_str(self.teacher_shape)}"
        if self.label_shape is not None:
            where += f", labels {_checks.shape_str(self.label_shape)}"
        return where

    def fail(self, prop: str, case: str, detail: str, difference: float) -> LossCheckError:
        message = (
            f"Property '{prop}' failed for {self._where()} ({case}): {detail}; "
            f"largest difference found: {difference:.6g}."
        )
        return LossCheckError(message, prop, difference)

    @contextlib.contextmanager
    def raised(self, prop: str, case: str) -> Iterator[None]:
        """Turn an exception raised by the loss into a :class:`LossCheckError` for ``prop``."""
        try:
            yield
        except LossCheckError:
            raise
        except Exception as exc:
            detail = f"the loss raised {type(exc).__name__}: {exc}"
            raise self.fail(prop, case, detail, math.nan) from exc

    # ------------------------------------------------------------------------------- inputs
    def _generator(self, offset: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1009 + offset)

    def inputs(
        self, dtype: torch.dtype, offset: int, scale: float = 1.0, all_ignored: bool = False
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Student and teacher ``scale * randn`` (float64 draws, then cast) and a label map with ignore pixels."""
        gen = self._generator(offset)
        student = (torch.randn(self.student_shape, generator=gen, dtype=torch.float64) * scale).to(self.device, dtype)
        teacher = (torch.randn(self.teacher_shape, generator=gen, dtype=torch.float64) * scale).to(self.device, dtype)
        return student, teacher, self.labels(gen, all_ignored)

    def labels(self, gen: torch.Generator, all_ignored: bool = False) -> Tensor | None:
        if self.label_shape is None or self.num_classes is None:
            return None
        if all_ignored:
            return torch.full(self.label_shape, self.ignore_index, dtype=torch.long, device=self.device)
        labels = torch.randint(0, self.num_classes, self.label_shape, generator=gen)
        flat = labels.view(-1)
        if flat.numel() > 1:  # some ignore pixels, never all of them
            ignore = torch.rand(flat.shape, generator=gen) < 0.2
            ignore[0], ignore[-1] = True, False
            flat[ignore] = self.ignore_index
        return labels.to(self.device)

    # ------------------------------------------------------------------------------ calling
    def cast(self, dtype: torch.dtype) -> LossFn:
        """A deep copy of the loss module on the device in ``dtype`` (functions are returned as they are)."""
        if dtype not in self._cast_cache:
            if isinstance(self.loss, nn.Module):
                self._cast_cache[dtype] = copy.deepcopy(self.loss).to(device=self.device, dtype=dtype)
            else:
                self._cast_cache[dtype] = self.loss
        return self._cast_cache[dtype]

    @staticmethod
    def fresh(base: LossFn) -> LossFn:
        return copy.deepcopy(base) if isinstance(base, nn.Module) else base

    def call(
        self, fn: LossFn, student: Tensor, teacher: Tensor, labels: Tensor | None, prop: str
    ) -> tuple[Tensor, ...]:
        """Seed, call ``fn`` and return its output(s) as a tuple of floating tensors."""
        torch.manual_seed(self.seed)
        out = fn(student, teacher) if labels is None else fn(student, teacher, labels)
        outputs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        if not outputs or not all(isinstance(o, Tensor) and o.is_floating_point() for o in outputs):
            kinds = ", ".join(type(o).__name__ if not isinstance(o, Tensor) else str(o.dtype) for o in outputs)
            detail = f"expected a floating-point tensor or a tuple of them, got ({kinds})"
            raise self.fail("output", f"while checking {prop}", detail, math.nan)
        return outputs

    def evaluate(
        self, base: LossFn, student: Tensor, teacher: Tensor, labels: Tensor | None, prop: str
    ) -> tuple[Tensor, ...]:
        """Call a fresh copy of ``base`` after seeding (the same randomness and state every time)."""
        return self.call(self.fresh(base), student, teacher, labels, prop)

    def projections(self, outputs: Sequence[Tensor], offset: int) -> list[Tensor]:
        """Fixed random ``grad_output`` tensors, one per output (so ``reduction="none"`` is covered too)."""
        gen = self._generator(offset)
        return [
            torch.rand(o.shape, generator=gen, dtype=torch.float64).add_(0.5).to(o.device, o.dtype) for o in outputs
        ]

    @staticmethod
    def scalar(outputs: Sequence[Tensor], weights: Sequence[Tensor]) -> Tensor | None:
        terms = [(o * w).sum() for o, w in zip(outputs, weights, strict=True) if o.requires_grad]
        return torch.stack([t.to(torch.float64) for t in terms]).sum() if terms else None

    # ----------------------------------------------------------------------------- checks
    def check_gradcheck(self) -> None:
        prop = "gradcheck"
        case = "float64 gradcheck of the student path" + (", fast mode" if self.fast_gradcheck else "")
        base = self.cast(torch.float64)
        student, teacher, labels = self.inputs(torch.float64, offset=1)
        student.requires_grad_(True)

        def fn(x: Tensor) -> tuple[Tensor, ...]:
            return self.evaluate(base, x, teacher, labels, prop)

        hint = (
            "if the loss detaches part of its value on purpose (e.g. weights), declare exact_gradient=False "
            "with a reference (an argument, or its `distillation_checks` declaration)"
        )
        with self.raised(prop, case):
            if not any(o.requires_grad for o in fn(student)):
                raise self.fail(prop, case, "no output requires grad: the student path is disconnected", math.nan)
            if self.fast_gradcheck:
                # gradcheck's own fast_mode re-runs the slow mode on failure (minutes for 64 x 64 inputs):
                # compare one random directional derivative here, with the same tolerances.
                analytical, numerical = self._directional_derivative(fn, student)
                gap = abs(analytical - numerical)
                if not gap <= _GRADCHECK_ATOL + _GRADCHECK_RTOL * abs(numerical):
                    detail = (
                        f"along a random direction, autograd gives {analytical:.6g} and finite differences "
                        f"{numerical:.6g}; {hint}"
                    )
                    raise self.fail(prop, case, detail, gap)
                return
        try:
            torch.autograd.gradcheck(fn, (student,), eps=_GRADCHECK_EPS, atol=_GRADCHECK_ATOL, rtol=_GRADCHECK_RTOL)
        except GradcheckError as exc:
            largest = self._gradient_gap(fn, student)
            headline = str(exc).strip().splitlines()[0].rstrip(",")
            detail = f"the autograd gradient does not match finite differences ({headline}); {hint}"
            raise self.fail(prop, case, detail, largest) from exc
        except LossCheckError:
            raise
        except Exception as exc:
            raise self.fail(prop, case, f"the loss raised {type(exc).__name__}: {exc}", math.nan) from exc

    def _projected(
        self, fn: Callable[[Tensor], tuple[Tensor, ...]], student: Tensor
    ) -> tuple[Tensor, Callable[[Tensor], float]]:
        """The autograd gradient of a fixed random projection of the outputs, and that projection as a function."""
        x = student.detach().clone().requires_grad_(True)
        outputs = fn(x)
        weights = self.projections(outputs, offset=2)
        total = self.scalar(outputs, weights)
        grad = None if total is None else torch.autograd.grad(total, x, allow_unused=True)[0]

        def projected(at: Tensor) -> float:
            with torch.no_grad():
                value = 0.0
                for out, weight in zip(fn(at), weights, strict=True):
                    value += float((out.to(torch.float64) * weight).sum())
                return value

        return (torch.zeros_like(x) if grad is None else grad.detach()), projected

    def _directional_derivative(
        self, fn: Callable[[Tensor], tuple[Tensor, ...]], student: Tensor
    ) -> tuple[float, float]:
        """Autograd and central-difference derivatives of the projected outputs along a random unit direction."""
        analytical, projected = self._projected(fn, student)
        x = student.detach()
        direction = torch.randn(x.shape, generator=self._generator(3), dtype=torch.float64).to(x)
        direction = direction / direction.norm()
        eps = _GRADCHECK_EPS
        numerical = (projected(x + eps * direction) - projected(x - eps * direction)) / (2 * eps)
        return float((analytical * direction).sum()), numerical

    def _gradient_gap(self, fn: Callable[[Tensor], tuple[Tensor, ...]], student: Tensor) -> float:
        """Largest gap between autograd and central differences of the projected outputs, element by element."""
        if student.numel() > 4096:
            analytical_dir, numerical_dir = self._directional_derivative(fn, student)
            return abs(analytical_dir - numerical_dir)
        analytical, projected = self._projected(fn, student)
        x = student.detach().clone()
        numerical = torch.zeros_like(x)
        flat_x, flat_n = x.view(-1), numerical.view(-1)
        eps = _GRADCHECK_EPS
        for i in range(flat_x.numel()):
            value = float(flat_x[i])
            flat_x[i] = value + eps
            plus = projected(x)
            flat_x[i] = value - eps
            minus = projected(x)
            flat_x[i] = value
            flat_n[i] = (plus - minus) / (2 * eps)
        return _max_abs(analytical - numerical)

    def check_finite(self, same_shape: bool) -> None:
        base = self.cast(self.dtype)
        cases: list[tuple[str, Tensor, Tensor, Tensor | None]] = []
        for k, scale in enumerate(self.scales):
            student, teacher, labels = self.inputs(self.dtype, offset=10 + k, scale=scale)
            cases.append((f"random inputs of scale {scale:g} in {self.dtype}", student, teacher, labels))
        if same_shape:
            student, _, labels = self.inputs(self.dtype, offset=20)
            cases.append((f"student == teacher in {self.dtype}", student, student.clone(), labels))
        student, teacher, labels = self.inputs(self.dtype, offset=21, scale=0.0)
        cases.append((f"all-zero student and teacher in {self.dtype}", student, teacher, labels))
        if self.label_shape is not None:
            student, teacher, labels = self.inputs(self.dtype, offset=22, all_ignored=True)
            cases.append((f"every label is ignore_index={self.ignore_index}, {self.dtype}", student, teacher, labels))
        for case, student, teacher, labels in cases:
            self._finite_case(base, case, student, teacher, labels)

    def _finite_case(self, base: LossFn, case: str, student: Tensor, teacher: Tensor, labels: Tensor | None) -> None:
        prop = "finite"
        student.requires_grad_(True)
        module = self.fresh(base)
        with self.raised(prop, case):
            outputs = self.call(module, student, teacher, labels, prop)
            for i, out in enumerate(outputs):
                if not bool(torch.isfinite(out).all()):
                    bad = int((~torch.isfinite(out)).sum())
                    which = "the loss" if len(outputs) == 1 else f"output {i}"
                    raise self.fail(prop, case, f"{which} has {bad} NaN/Inf values", _max_abs(out))
            total = self.scalar(outputs, [torch.ones_like(o) for o in outputs])
            if total is None:
                return
            total.backward()
        grads = [("student.grad", student.grad)]
        if isinstance(module, nn.Module):
            grads += [(f"gradient of parameter `{n}`", p.grad) for n, p in module.named_parameters()]
        for name, grad in grads:
            if grad is not None and not bool(torch.isfinite(grad).all()):
                bad = int((~torch.isfinite(grad)).sum())
                raise self.fail(prop, case, f"{name} has {bad} NaN/Inf values", math.inf)

    def check_inputs_unchanged(self) -> None:
        prop, case = "inputs_unchanged", f"one call, {self.dtype}"
        base = self.cast(self.dtype)
        student, teacher, labels = self.inputs(self.dtype, offset=5)
        student.requires_grad_(True)
        named = [("student", student), ("teacher", teacher)] + ([("labels", labels)] if labels is not None else [])
        before = [x.detach().clone() for _, x in named]
        with self.raised(prop, case):
            self.evaluate(base, student, teacher, labels, prop)
        changed = [
            (name, _max_abs(now.detach().to(torch.float64) - was.to(torch.float64)))
            for (name, now), was in zip(named, before, strict=True)
            if not torch.equal(now.detach(), was)
        ]
        if changed:
            names = " and ".join(name for name, _ in changed)
            raise self.fail(prop, case, f"the loss modified {names} in place", max(d for _, d in changed))

    def check_teacher(self) -> None:
        case = f"teacher with requires_grad=True, {self.dtype}"
        base = self.cast(self.dtype)
        student, teacher, labels = self.inputs(self.dtype, offset=30)
        student.requires_grad_(True)
        teacher.requires_grad_(True)
        with self.raised("teacher_grad", case):
            outputs = self.evaluate(base, student, teacher, labels, "teacher_grad")
        reaches = _graph_reaches(outputs, teacher)
        total = self.scalar(outputs, self.projections(outputs, offset=31))
        if total is not None:
            with self.raised("teacher_grad", case):
                total.backward()
        largest = 0.0 if teacher.grad is None else _max_abs(teacher.grad)
        if largest > 0:
            raise self.fail(
                "teacher_grad", case, "the teacher received a gradient (detach it inside the loss)", largest
            )
        if reaches:
            raise self.fail(
                "teacher_graph",
                case,
                "the loss's autograd graph reaches the teacher, so backward runs into the teacher network "
                "(detach the teacher inside the loss)",
                largest,
            )

    def check_zero_at_equal(self) -> None:
        prop, case = "zero_at_equal", "student == teacher, float64"
        base = self.cast(torch.float64)
        student, _, labels = self.inputs(torch.float64, offset=40)
        teacher = student.detach().clone()
        student.requires_grad_(True)
        with self.raised(prop, case):
            outputs = self.evaluate(base, student, teacher, labels, prop)
        largest = max(_max_abs(o) for o in outputs)
        if not largest <= self.atol:
            raise self.fail(prop, case, f"the loss is not zero (atol={self.atol:g})", largest)
        total = self.scalar(outputs, [torch.ones_like(o) for o in outputs])
        if total is not None:
            with self.raised(prop, case):
                total.backward()
            largest = 0.0 if student.grad is None else _max_abs(student.grad)
            if not largest <= self.atol:
                raise self.fail(prop, case, f"the student's gradient is not zero (atol={self.atol:g})", largest)

    def check_shift_invariant(self, kind: str) -> None:
        prop = f"{kind}_shift_invariant"
        base = self.cast(torch.float64)
        student, teacher, labels = self.inputs(torch.float64, offset=50)
        gen = self._generator(51)

        def shift(x: Tensor) -> Tensor:
            # channel: one constant per channel for every image and position; pixel: one per pixel for all channels
            shape = [1, x.shape[1]] + [1] * (x.dim() - 2) if kind == "channel" else [x.shape[0], 1, *x.shape[2:]]
            return 3.0 * torch.randn(shape, generator=gen, dtype=torch.float64).to(x.device)

        what = "a per-channel constant" if kind == "channel" else "a per-pixel constant (same for all channels)"
        with self.raised(prop, f"float64, {what}"):
            original = self.evaluate(base, student, teacher, labels, prop)
            for name, s, t in (
                ("student", student + shift(student), teacher),
                ("teacher", student, teacher + shift(teacher)),
            ):
                case = f"float64, {what} added to the {name}"
                shifted = self.evaluate(base, s, t, labels, prop)
                self.compare(prop, case, shifted, original, "the loss changed")

    def compare(self, prop: str, case: str, actual: Sequence[Tensor], expected: Sequence[Tensor], what: str) -> None:
        if len(actual) != len(expected):
            raise self.fail(prop, case, f"{len(actual)} outputs against {len(expected)} expected", math.nan)
        for i, (a, b) in enumerate(zip(actual, expected, strict=True)):
            label = f"output {i}" if len(actual) > 1 else "output"
            if a.shape != b.shape:
                raise self.fail(
                    prop,
                    case,
                    f"{label} has shape {_checks.shape_str(a.shape)}, expected {_checks.shape_str(b.shape)}",
                    math.nan,
                )
            largest, ok = _max_mismatch(a, b, self.atol, self.rtol)
            if not ok:
                raise self.fail(prop, case, f"{what} (atol={self.atol:g}, rtol={self.rtol:g})", largest)

    def check_reference(self, reference: LossFn, exact_gradient: bool) -> bool:
        """Compare values and student gradients with ``reference``; return whether gradients were compared."""
        case = "float64 inputs, compared with the declared reference"
        base = self.cast(torch.float64)
        student, teacher, labels = self.inputs(torch.float64, offset=60)
        student.requires_grad_(True)
        student_ref = student.detach().clone().requires_grad_(True)
        with self.raised("reference", case):
            outputs = self.evaluate(base, student, teacher, labels, "reference")
        with self.raised("reference", case + " (the reference raised)"):
            expected = self.call(reference, student_ref, teacher.clone(), labels, "reference")
        self.compare("reference", case, outputs, expected, "the loss differs from the reference")
        if not any(e.requires_grad for e in expected):
            if not exact_gradient:
                raise self.fail(
                    "reference_gradient",
                    case,
                    "exact_gradient=False needs a differentiable reference, but its output does not require grad",
                    math.nan,
                )
            return False
        weights = self.projections(outputs, offset=61)
        total, total_ref = self.scalar(outputs, weights), self.scalar(expected, weights)
        grad = torch.zeros_like(student)
        if total is not None:
            with self.raised("reference_gradient", case):
                (g,) = torch.autograd.grad(total, student, allow_unused=True)
            grad = g if g is not None else grad
        assert total_ref is not None  # at least one reference output requires grad
        (grad_ref,) = torch.autograd.grad(total_ref, student_ref, allow_unused=True)
        if grad_ref is None:
            grad_ref = torch.zeros_like(student_ref)
        largest, ok = _max_mismatch(grad, grad_ref, self.atol, self.rtol)
        if not ok:
            raise self.fail(
                "reference_gradient",
                case,
                f"the student's gradient differs from the reference's (atol={self.atol:g}, rtol={self.rtol:g})",
                largest,
            )
        return True

    def check_state_dict(self, module: nn.Module) -> None:
        prop = "state_dict"
        unregistered = _unregistered_tensors(module)
        if unregistered:
            raise self.fail(
                prop,
                "module attributes",
                "tensor attributes not registered as parameter or buffer (they miss state_dict(), .to() and "
                f".double()): {', '.join(unregistered)}",
                math.nan,
            )
        case = "a fresh copy loaded with load_state_dict() of a used copy, float64"
        base = self.cast(torch.float64)
        assert isinstance(base, nn.Module)
        untouched = copy.deepcopy(base)
        used = copy.deepcopy(base)
        with self.raised(prop, case + " (while using the copy)"):
            for k in range(2):  # forward passes change queues, running statistics, counters
                student, teacher, labels = self.inputs(torch.float64, offset=70 + k)
                self.call(used, student, teacher, labels, prop)
            gen = self._generator(72)
            with torch.no_grad():  # stands in for an optimizer step
                for p in used.parameters():
                    if p.is_floating_point():
                        p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.device, p.dtype))
        with self.raised(prop, case + " (load_state_dict raised)"):
            untouched.load_state_dict(used.state_dict())
        _copy_generator_states(used, untouched)  # random state is not module state: a trainer saves it apart
        with self.raised(prop, case):
            for k in range(2):  # two calls in a row: state changed by the first must match too
                student, teacher, labels = self.inputs(torch.float64, offset=73 + k)
                expected = self.call(used, student, teacher, labels, prop)
                actual = self.call(untouched, student, teacher, labels, prop)
                self.compare(prop, f"{case}, call {k + 1}", actual, expected, "the loaded copy gives a different loss")

    def check_deterministic(self) -> None:
        prop, case = "deterministic", f"two calls after torch.manual_seed({self.seed}), {self.dtype}"
        base = self.cast(self.dtype)
        results = []
        for _ in range(2):
            student, teacher, labels = self.inputs(self.dtype, offset=80)
            student.requires_grad_(True)
            with self.raised(prop, case):
                outputs = self.evaluate(base, student, teacher, labels, prop)
                total = self.scalar(outputs, [torch.ones_like(o) for o in outputs])
                if total is not None:
                    total.backward()
            grad = student.grad if student.grad is not None else torch.zeros_like(student)
            results.append((*outputs, grad))
        self.compare(prop, case, results[1], results[0], "the two calls differ (loss or student gradient)")


def _graph_reaches(outputs: Sequence[Tensor], target: Tensor) -> bool:
    """Whether the autograd graph of ``outputs`` contains the leaf ``target``."""
    if any(o is target for o in outputs):
        return True
    stack: list[Any] = [o.grad_fn for o in outputs if o.grad_fn is not None]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if getattr(node, "variable", None) is target:
            return True
        stack.extend(child for child, _ in node.next_functions)
    return False


def _copy_generator_states(source: nn.Module, target: nn.Module) -> None:
    """Give every ``torch.Generator`` attribute of ``target`` the state of the same one in ``source``."""
    for (_, src), (_, dst) in zip(source.named_modules(), target.named_modules(), strict=True):
        for key, value in vars(src).items():
            other = vars(dst).get(key)
            if isinstance(value, torch.Generator) and isinstance(other, torch.Generator):
                other.set_state(value.get_state())


def _unregistered_tensors(module: nn.Module) -> list[str]:
    names = []
    for prefix, sub in module.named_modules():
        for key, value in vars(sub).items():
            if isinstance(value, Tensor):
                names.append(f"{prefix}.{key}" if prefix else key)
    return names


@contextlib.contextmanager
def _restored_rng(device: torch.device) -> Iterator[None]:
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def check_distillation_loss(
    loss: LossFn,
    student_shape: Sequence[int],
    *,
    teacher_shape: Sequence[int] | None = None,
    with_labels: bool | None = None,
    num_classes: int | None = None,
    label_shape: Sequence[int] | None = None,
    ignore_index: int | None = None,
    zero_at_equal: bool | None = None,
    channel_shift_invariant: bool | None = None,
    pixel_shift_invariant: bool | None = None,
    reference: LossFn | None = None,
    exact_gradient: bool | None = None,
    fast_gradcheck: bool = False,
    scales: Sequence[float] = (1e4, 1e-6),
    atol: float = 1e-6,
    rtol: float = 1e-5,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> CheckReport:
    r"""Run the battery of checks every segkd loss passes on a distillation loss.

    ``loss`` is called as ``loss(student, teacher)`` or, with ``with_labels=True``,
    ``loss(student, teacher, labels)``, on generated inputs of the given (small) shapes, and must
    return a floating tensor (any shape: ``reduction="none"`` is fine) or a tuple of them. The
    properties, in order (``LossCheckError.property_name`` names the one that failed):

    * ``output``: the loss returns a floating tensor or a tuple of them (on every call).
    * ``inputs_unchanged``: the loss does not modify ``student``, ``teacher`` or ``labels`` in place.
    * ``deterministic``: two calls after ``torch.manual_seed(seed)``, on fresh copies, give the
      same loss and student gradient (checked early: without it the other checks mean little).
    * ``gradcheck``: :func:`torch.autograd.gradcheck` of the student path in float64 (a module is
      deep-copied and cast to float64; its parameters stay fixed). Each evaluation seeds the RNG
      and uses a fresh copy, so random masks and internal state are the same every time.
      For :math:`f(s) = \mathcal{L}(s, t)` the autograd gradient must equal central differences,
      :math:`\partial f / \partial s_i \approx (f(s + \epsilon e_i) - f(s - \epsilon e_i)) / 2\epsilon`.
      Skipped with ``exact_gradient=False`` (see below); one random direction only with
      ``fast_gradcheck=True``.
    * ``finite``: finite outputs, student gradients and parameter gradients, in ``dtype``, for
      random inputs of each scale in ``scales`` (large and tiny logits), for ``student == teacher``
      (same shapes only), for all-zero inputs, and with every label ignored (with labels).
    * ``teacher_grad``: with ``teacher.requires_grad=True``, after backward ``teacher.grad`` is
      ``None`` or zero.
    * ``teacher_graph``: the loss's autograd graph does not reach the teacher at all (it is
      detached inside), so backward never runs into a teacher network.
    * ``zero_at_equal`` (declared): for ``student == teacher`` the loss and the student's gradient
      are zero within ``atol``.
    * ``channel_shift_invariant`` (declared): adding a constant per channel (one value per channel
      for all images and positions) to the student, or to the teacher, leaves the loss unchanged.
    * ``pixel_shift_invariant`` (declared): the same for a constant per pixel, shared by all
      channels (losses on per-pixel class softmaxes: KD, DIST).
    * ``reference`` / ``reference_gradient`` (declared): the loss and, when the reference is
      differentiable, the student's gradient (for a random ``grad_output``) equal those of
      ``reference`` called on the same float64 inputs after the same seeding.
    * ``state_dict`` (modules): no tensor attribute escapes registration as a parameter or
      buffer; and a copy of the module taken before use, loaded with the ``state_dict()`` of a
      used copy (two forward passes, perturbed parameters), gives the same loss twice in a row.
      The state of ``torch.Generator`` attributes is copied across too: random state is not part
      of ``state_dict()``, a trainer checkpoints it separately.

    Losses that stop the gradient through part of their value on purpose, such as HWD's detached
    channel weights, have an autograd gradient that is not the derivative of their value, so
    ``gradcheck`` cannot pass: declare ``exact_gradient=False`` and give a differentiable
    ``reference`` that detaches the same parts; ``reference_gradient`` then checks the gradient.

    **Declarations**: a loss can carry these settings itself, in a ``distillation_checks`` attribute
    (see :class:`LossDeclaration`); every segkd loss does, so ``check_distillation_loss(loss, shape)``
    checks its invariances and its float64 reference with no other argument. Each of ``with_labels``,
    ``num_classes``, ``ignore_index``, ``zero_at_equal``, ``channel_shift_invariant``,
    ``pixel_shift_invariant``, ``reference`` and ``exact_gradient`` left at ``None`` takes the declared
    value (``False``, ``None``, ``255`` or ``True`` without a declaration); a value given here wins.
    A declared ``teacher_channels`` sets the teacher's shape when ``teacher_shape`` is not given.

    The object passed as ``loss`` is never changed (its copies stay in the train or eval mode it is
    in) and the global random state is restored on exit. Keep the shapes small: gradcheck costs
    two loss evaluations per student element (see ``fast_gradcheck``).

    Args:
        loss: the loss: a function or an ``nn.Module`` taking ``(student, teacher[, labels])``.
        student_shape: shape of the generated student tensor, ``(N, C, H, W)`` or ``(N, C, L)``.
        teacher_shape: shape of the teacher tensor (default: ``student_shape``, with the declared
            ``teacher_channels`` if any).
        with_labels: also pass an integer label map (requires ``num_classes``).
        num_classes: labels are drawn from ``[0, num_classes)``, about 20% set to ``ignore_index``.
        label_shape: shape of the label map (default: ``(N, *student_shape[2:])``).
        ignore_index: the label of ignored pixels.
        zero_at_equal: declare that the loss and its gradient vanish at ``student == teacher`` (a
            declared one is skipped when the teacher's shape differs; a given one raises there).
        channel_shift_invariant: declare invariance to a per-channel constant.
        pixel_shift_invariant: declare invariance to a per-pixel constant shared by all channels.
        reference: an independent implementation taking the same arguments, compared in float64.
        exact_gradient: ``False`` when the loss detaches part of its value on purpose; needs
            ``reference``. With a given ``reference``, it defaults to ``True``, not to the declared value.
        fast_gradcheck: instead of the full gradcheck, compare the autograd and central-difference
            derivatives of a random projection of the outputs along one random direction (three
            evaluations instead of two per student element, as gradcheck's ``fast_mode`` but
            without its slow re-run on failure), for inputs that must be large, e.g. a
            discriminator that needs 64 x 64 logits. gradcheck's ``atol`` (1e-5) is absolute:
            a mean over many pixels has tiny gradients, so check ``reduction="sum"`` there.
        scales: standard deviations of the random inputs of the ``finite`` check.
        atol: absolute tolerance of every float64 comparison (and of ``zero_at_equal``).
        rtol: relative tolerance of every float64 comparison.
        seed: seeds the inputs and ``torch.manual_seed`` before every call.
        device: where inputs and module copies live.
        dtype: floating dtype of the ``finite``, teacher and ``deterministic`` checks (the others
            run in float64).

    Shape:
        - student: ``student_shape``; teacher: ``teacher_shape``; labels: ``label_shape``.

    Returns:
        A :class:`CheckReport` listing the properties that passed and why others were skipped.

    Raises:
        LossCheckError: (an ``AssertionError``) a property failed; the message names the property,
            the shapes, the inputs and the largest difference found.
        TypeError: an argument of the wrong type.
        ValueError: inconsistent settings (e.g. ``with_labels`` without ``num_classes``,
            ``zero_at_equal`` with different student and teacher shapes, ``exact_gradient=False``
            without ``reference``).

    Example:
        >>> from segkd.losses.cwd import CWDLoss
        >>> from segkd.testing.checks import check_distillation_loss
        >>> from segkd.testing.reference import cwd_loss_reference
        >>> report = check_distillation_loss(
        ...     CWDLoss(tau=4.0),
        ...     (2, 3, 4, 5),
        ...     zero_at_equal=True,
        ...     channel_shift_invariant=True,
        ...     reference=lambda s, t: cwd_loss_reference(s, t, tau=4.0),
        ... )
        >>> len(report.passed), dict(report.skipped)
        (12, {'pixel_shift_invariant': 'not declared'})
    """
    if not callable(loss):
        raise TypeError(f"Expected `loss` to be callable (a function or an nn.Module), got {type(loss).__name__}.")
    declared = declared_checks(loss)
    student_dims = _checks.check_shape_spec(student_shape, "student_shape", min_dims=3)
    if teacher_shape is not None:
        teacher_dims = _checks.check_shape_spec(teacher_shape, "teacher_shape", min_dims=3)
    elif declared.teacher_channels is not None:
        teacher_dims = (student_dims[0], declared.teacher_channels, *student_dims[2:])
    else:
        teacher_dims = student_dims
    declared_zero = zero_at_equal is None and declared.zero_at_equal
    with_labels = declared.with_labels if with_labels is None else with_labels
    num_classes = declared.num_classes if num_classes is None else num_classes
    ignore_index = declared.ignore_index if ignore_index is None else ignore_index
    zero_at_equal = declared.zero_at_equal if zero_at_equal is None else zero_at_equal
    channel_shift_invariant = (
        declared.channel_shift_invariant if channel_shift_invariant is None else channel_shift_invariant
    )
    pixel_shift_invariant = declared.pixel_shift_invariant if pixel_shift_invariant is None else pixel_shift_invariant
    if reference is None:
        reference = declared.reference
        exact_gradient = declared.exact_gradient if exact_gradient is None else exact_gradient
    elif exact_gradient is None:
        exact_gradient = True
    exact = bool(exact_gradient)
    labels_dims: tuple[int, ...] | None = None
    if with_labels:
        if num_classes is None:
            raise ValueError("Expected `num_classes` to be given when `with_labels=True`, got None.")
        _checks.check_positive_int(num_classes, "num_classes")
        _checks.check_int(ignore_index, "ignore_index")
        default = (student_dims[0], *student_dims[2:])
        labels_dims = default if label_shape is None else _checks.check_shape_spec(label_shape, "label_shape", 1)
    zero_skipped = "not declared"
    if declared_zero and teacher_dims != student_dims:  # declared for equal shapes only: nothing to check here
        zero_at_equal, zero_skipped = False, "declared, but the teacher's shape differs from the student's"
    if zero_at_equal and teacher_dims != student_dims:
        raise ValueError(
            "Expected `teacher_shape` to equal `student_shape` when `zero_at_equal=True`, "
            f"got {_checks.shape_str(teacher_dims)} and {_checks.shape_str(student_dims)}."
        )
    if reference is not None and not callable(reference):
        raise TypeError(f"Expected `reference` to be callable or None, got {type(reference).__name__}.")
    if not exact and reference is None:
        raise ValueError(
            "Expected a `reference` when `exact_gradient=False`: its gradient replaces gradcheck, got None."
        )
    scale_values = tuple(_checks.check_non_negative(s, "scales") for s in scales)
    atol = _checks.check_non_negative(atol, "atol")
    rtol = _checks.check_non_negative(rtol, "rtol")
    _checks.check_int(seed, "seed")
    dtype = _checks.check_floating_dtype(dtype, "dtype")
    device = torch.device(device)

    battery = _Battery(
        loss,
        student_dims,
        teacher_dims,
        labels_dims,
        num_classes,
        ignore_index,
        atol,
        rtol,
        seed,
        device,
        dtype,
        scale_values,
        bool(fast_gradcheck),
    )
    passed: list[str] = []
    skipped: dict[str, str] = {}
    with _restored_rng(device):
        battery.check_inputs_unchanged()
        battery.check_deterministic()
        passed += ["output", "inputs_unchanged", "deterministic"]
        if exact:
            battery.check_gradcheck()
            passed.append("gradcheck")
        else:
            skipped["gradcheck"] = "exact_gradient=False: the gradient is checked against the reference"
        battery.check_finite(same_shape=teacher_dims == student_dims)
        passed.append("finite")
        battery.check_teacher()
        passed += ["teacher_grad", "teacher_graph"]
        if zero_at_equal:
            battery.check_zero_at_equal()
            passed.append("zero_at_equal")
        else:
            skipped["zero_at_equal"] = zero_skipped
        for kind, holds in (("channel", channel_shift_invariant), ("pixel", pixel_shift_invariant)):
            if holds:
                battery.check_shift_invariant(kind)
                passed.append(f"{kind}_shift_invariant")
            else:
                skipped[f"{kind}_shift_invariant"] = "not declared"
        if reference is not None:
            compared = battery.check_reference(reference, exact)
            passed.append("reference")
            if compared:
                passed.append("reference_gradient")
            else:
                skipped["reference_gradient"] = "the reference's output does not require grad"
        else:
            skipped["reference"] = skipped["reference_gradient"] = "no reference given"
        if isinstance(loss, nn.Module):
            battery.check_state_dict(loss)
            passed.append("state_dict")
        else:
            skipped["state_dict"] = "not an nn.Module"
    return CheckReport(tuple(passed), skipped, student_dims, teacher_dims, labels_dims)
