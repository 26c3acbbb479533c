"""CIRKD: mini-batch and memory terms against float64 loop references, queue semantics, module behaviour."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from segkd.losses._cirkd_memory import concat_all_gather, resize_labels_nearest
from segkd.losses.cirkd import (
    CIRKDLoss,
    CIRKDMemoryLoss,
    CIRKDMiniBatchLoss,
    cirkd_memory_kl,
    cirkd_minibatch_loss,
)
from segkd.testing import strategies as sks
from segkd.testing.checks import check_distillation_loss
from segkd.testing.reference.cirkd import (
    cirkd_memory_kl_reference,
    cirkd_minibatch_loss_reference,
    cirkd_pixel_kd_reference,
)

TINY = {"pixel_memory_size": 12, "region_memory_size": 5, "pixel_contrast_size": 9, "region_contrast_size": 6}


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _memory(num_classes: int = 3, s_ch: int = 4, t_ch: int = 5, seed: int = 0, **kwargs) -> CIRKDMemoryLoss:
    torch.manual_seed(seed)  # the projection head's initialisation
    settings = {**TINY, **kwargs}
    return CIRKDMemoryLoss(num_classes, s_ch, t_ch, generator=torch.Generator().manual_seed(seed), **settings)


# ----------------------------------------------------------------------------------------------- mini-batch


@pytest.mark.parametrize(
    ("batch", "s_ch", "t_ch", "height", "width", "tau"),
    [(2, 3, 5, 3, 4, 0.1), (3, 4, 4, 2, 3, 0.5), (1, 2, 6, 3, 3, 1.0), (2, 1, 1, 2, 2, 0.2)],
)
def test_minibatch_matches_reference(batch, s_ch, t_ch, height, width, tau):
    student = _randn(batch, s_ch, height, width, seed=1)
    teacher = _randn(batch, t_ch, height, width, seed=2)
    for reduction in ("mean", "sum", "none"):
        got = cirkd_minibatch_loss(student, teacher, tau=tau, reduction=reduction)
        want = cirkd_minibatch_loss_reference(student, teacher, tau=tau, reduction=reduction)
        assert got.shape == want.shape == ((batch, batch) if reduction == "none" else ())
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_minibatch_float32_close_to_float64_reference():
    student, teacher = _randn(2, 6, 4, 5, seed=3).float(), _randn(2, 8, 4, 5, seed=4).float()
    got = cirkd_minibatch_loss(student, teacher)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), cirkd_minibatch_loss_reference(student, teacher), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("height", "width", "pool"), [(5, 7, 2), (4, 4, 2), (5, 5, 3), (2, 3, 4), (3, 3, 1)])
def test_minibatch_pooling_matches_reference(height, width, pool):
    student, teacher = _randn(2, 3, height, width, seed=5), _randn(2, 4, height, width, seed=6)
    got = cirkd_minibatch_loss(student, teacher, tau=0.2, pool=pool)
    want = cirkd_minibatch_loss_reference(student, teacher, tau=0.2, pool=pool)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    if pool > 1:  # pooling changes the result
        assert not torch.allclose(got, cirkd_minibatch_loss(student, teacher, tau=0.2))


def test_minibatch_identical_or_rescaled_teacher_gives_zero():
    teacher = _randn(3, 4, 3, 3, seed=7)
    assert cirkd_minibatch_loss(teacher.clone(), teacher).item() == pytest.approx(0.0, abs=1e-12)
    # Each position's channel vector is normalised: a positive per-pixel rescaling changes nothing.
    scale = _randn(3, 1, 3, 3, seed=8).abs() + 0.5
    assert cirkd_minibatch_loss(teacher * scale, teacher).item() == pytest.approx(0.0, abs=1e-12)
    assert cirkd_minibatch_loss(_randn(3, 4, 3, 3, seed=9), teacher).item() > 1e-3


def test_minibatch_single_pixel_images_give_zero():
    # One position: each similarity row has a single entry, so both distributions are [1].
    student, teacher = _randn(3, 4, 1, 1, seed=10, dtype=torch.float32), _randn(3, 2, 1, 1, seed=11)
    got = cirkd_minibatch_loss(student.requires_grad_(), teacher.float())
    assert got.item() == 0.0
    got.backward()
    assert torch.isfinite(student.grad).all()


def test_minibatch_large_inputs_and_zero_vectors_are_finite():
    student = _randn(2, 3, 3, 3, seed=12, dtype=torch.float32) * 1e4
    teacher = torch.zeros(2, 3, 3, 3)  # normalising a zero vector gives zeros: uniform similarities
    student.requires_grad_()
    loss = cirkd_minibatch_loss(student, teacher, tau=0.01)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(student.grad).all()


def test_minibatch_gradcheck():
    student = _randn(2, 3, 2, 2, seed=13).requires_grad_()
    teacher = _randn(2, 4, 2, 2, seed=14)
    assert torch.autograd.gradcheck(lambda s: cirkd_minibatch_loss(s, teacher, tau=0.5), (student,))
    assert torch.autograd.gradcheck(lambda s: cirkd_minibatch_loss(s, teacher, pool=2, reduction="none"), (student,))


def test_minibatch_teacher_gets_no_gradient_and_module_equals_function():
    student = _randn(2, 3, 3, 3, seed=15).requires_grad_()
    teacher = _randn(2, 5, 3, 3, seed=16).requires_grad_()
    module = CIRKDMiniBatchLoss(tau=0.3, pool=2, reduction="sum")
    loss = module(student, teacher)
    loss.backward()
    assert teacher.grad is None
    assert student.grad is not None
    assert torch.equal(loss, cirkd_minibatch_loss(student, teacher, 0.3, 2, "sum"))
    assert "tau=0.3" in repr(module)


def test_similarities_stay_in_float32_under_autocast():
    student, teacher = _randn(2, 4, 3, 3, seed=17).float(), _randn(2, 6, 3, 3, seed=18).float()
    labels = torch.randint(0, 3, (2, 3, 3), generator=torch.Generator().manual_seed(19))
    pixels, regions = _entries(5, 6, 20).float(), _entries(3, 6, 21).float()
    embed = _randn(2, 6, 3, 3, seed=22).float()
    want = (cirkd_minibatch_loss(student, teacher), *cirkd_memory_kl(embed, teacher, labels, pixels, regions))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = (cirkd_minibatch_loss(student, teacher), *cirkd_memory_kl(embed, teacher, labels, pixels, regions))
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w)


@given(seed=st.integers(0, 2**16), batch=st.integers(1, 3), side=st.integers(1, 4))
def test_minibatch_is_non_negative_and_symmetric_in_pairs(seed, batch, side):
    student, teacher = _randn(batch, 2, side, side, seed=seed), _randn(batch, 3, side, side, seed=seed + 1)
    terms = cirkd_minibatch_loss(student, teacher, reduction="none")
    assert (terms >= -1e-12).all()
    # Swapping the images of the batch permutes the pair terms the same way.
    perm = torch.arange(batch).flip(0)
    swapped = cirkd_minibatch_loss(student[perm], teacher[perm], reduction="none")
    torch.testing.assert_close(swapped, terms[perm][:, perm])


@given(
    pair=sks.feature_map_pairs(
        sks.segmentation_shapes(max_batch=3, max_channels=5, max_side=4),
        teacher_channels=st.integers(1, 5),
        magnitude=st.sampled_from([0.1, 1.0, 30.0]),
        dtype=torch.float64,
    ),
    tau=st.sampled_from([0.05, 0.1, 1.0]),
    pool=st.sampled_from([None, 2, 3]),
)
def test_minibatch_matches_reference_on_generated_features(pair, tau, pool):
    student, teacher = pair
    got = cirkd_minibatch_loss(student, teacher, tau=tau, pool=pool, reduction="none")
    want = cirkd_minibatch_loss_reference(student, teacher, tau=tau, pool=pool, reduction="none")
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(
    ("student", "teacher", "kwargs", "error", "match"),
    [
        (torch.randn(2, 3, 4), torch.randn(2, 3, 4), {}, ValueError, "4 dimensions"),
        (torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 5), {}, ValueError, "same shape except in dimension 1"),
        (torch.randn(2, 3, 4, 4), torch.randn(3, 3, 4, 4), {}, ValueError, "same shape except in dimension 1"),
        (torch.ones(2, 3, 4, 4, dtype=torch.long), torch.randn(2, 3, 4, 4), {}, TypeError, "floating-point"),
        ("x", torch.randn(2, 3, 4, 4), {}, TypeError, "torch.Tensor"),
        (torch.randn(0, 3, 4, 4), torch.randn(0, 3, 4, 4), {}, ValueError, "non-empty"),
        (torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), {"tau": 0.0}, ValueError, "`tau`"),
        (torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), {"pool": 0}, ValueError, "`pool`"),
        (torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), {"pool": 2.0}, TypeError, "`pool`"),
        (torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), {"reduction": "max"}, ValueError, "`reduction`"),
    ],
)
def test_minibatch_bad_input(student, teacher, kwargs, error, match):
    with pytest.raises(error, match=match):
        cirkd_minibatch_loss(student, teacher, **kwargs)


# ----------------------------------------------------------------------------------------- memory function


def _entries(count: int, dim: int, seed: int) -> torch.Tensor:
    return F.normalize(_randn(count, dim, seed=seed), dim=1)


@pytest.mark.parametrize(("label_size", "contrast_tau", "kd_tau"), [((3, 4), 0.1, 1.0), ((7, 9), 0.5, 2.0)])
def test_memory_kl_matches_reference(label_size, contrast_tau, kd_tau):
    student, teacher = _randn(2, 5, 3, 4, seed=20), _randn(2, 5, 3, 4, seed=21)
    labels = torch.randint(0, 3, (2, *label_size), generator=torch.Generator().manual_seed(22))
    labels[0, 0, :] = 255
    pixels, regions = _entries(7, 5, 23), _entries(4, 5, 24)
    got = cirkd_memory_kl(student, teacher, labels, pixels, regions, contrast_tau, kd_tau)
    want = cirkd_memory_kl_reference(student, teacher, labels, pixels, regions, contrast_tau, kd_tau)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_resize_labels_matches_interpolate_nearest():
    labels = torch.randint(0, 200, (2, 17, 23), generator=torch.Generator().manual_seed(25))
    for size in [(4, 6), (17, 23), (5, 3), (20, 30)]:
        want = F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()
        assert torch.equal(resize_labels_nearest(labels, size), want)


def test_memory_kl_identical_student_teacher_gives_zero_and_all_ignored_is_finite():
    teacher = _randn(2, 4, 2, 2, seed=26)
    labels = torch.zeros(2, 2, 2, dtype=torch.long)
    pixels, regions = _entries(5, 4, 27), _entries(3, 4, 28)
    p2p, p2r = cirkd_memory_kl(teacher.clone(), teacher, labels, pixels, regions)
    assert p2p.item() == pytest.approx(0.0, abs=1e-12)
    assert p2r.item() == pytest.approx(0.0, abs=1e-12)
    student = _randn(2, 4, 2, 2, seed=29).requires_grad_()
    p2p, p2r = cirkd_memory_kl(student, teacher, torch.full((2, 2, 2), 255), pixels, regions)
    assert p2p.item() == 0.0
    assert p2r.item() == 0.0
    (p2p + p2r).backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_memory_kl_gradcheck_and_teacher_no_grad():
    student = _randn(1, 3, 2, 2, seed=30).requires_grad_()
    teacher = _randn(1, 3, 2, 2, seed=31).requires_grad_()
    labels = torch.tensor([[[0, 1], [255, 2]]])
    pixels, regions = _entries(4, 3, 32).requires_grad_(), _entries(3, 3, 33)
    assert torch.autograd.gradcheck(lambda s: cirkd_memory_kl(s, teacher, labels, pixels, regions, 0.5), (student,))
    p2p, p2r = cirkd_memory_kl(student, teacher, labels, pixels, regions)
    (p2p + p2r).backward()
    assert teacher.grad is None
    assert pixels.grad is None


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"teacher": torch.randn(2, 5, 3, 3)}, ValueError, "same shape"),
        ({"labels": torch.zeros(2, 3, 3)}, TypeError, "integer dtype"),
        ({"labels": torch.zeros(3, 3, 3, dtype=torch.long)}, ValueError, "batch size 2"),
        ({"labels": torch.zeros(2, 3, dtype=torch.long)}, ValueError, "3 dimensions"),
        ({"pixels": torch.randn(4, 3)}, ValueError, "size 4 in dimension 1"),
        ({"regions": torch.randn(4)}, ValueError, "2 dimensions"),
        ({"contrast_tau": -1.0}, ValueError, "`contrast_tau`"),
        ({"kd_tau": 0.0}, ValueError, "`kd_tau`"),
    ],
)
def test_memory_kl_bad_input(change, error, match):
    args = {
        "student": torch.randn(2, 4, 3, 3),
        "teacher": torch.randn(2, 4, 3, 3),
        "labels": torch.zeros(2, 6, 6, dtype=torch.long),
        "pixels": torch.randn(5, 4),
        "regions": torch.randn(2, 4),
        "contrast_tau": 0.1,
        "kd_tau": 1.0,
    }
    args.update(change)
    with pytest.raises(error, match=match):
        cirkd_memory_kl(*args.values())


# ------------------------------------------------------------------------------------------- queues


def _onehot_features(codes: torch.Tensor, dim: int) -> torch.Tensor:
    """(N, h, w) integer codes -> (N, dim, h, w) one-hot unit features (code c is basis vector c)."""
    return F.one_hot(codes, dim).permute(0, 3, 1, 2).double()


def test_region_queue_pointer_wraps_per_class():
    memory = _memory(num_classes=3, t_ch=4, region_memory_size=2)
    before = memory.region_queue.clone()
    labels = torch.tensor([[[0, 0], [1, 255]]])
    for step in range(3):
        memory.enqueue(_onehot_features(torch.full((1, 2, 2), step), 4), labels)
    assert memory.region_queue_ptr.tolist() == [1, 1, 0]  # classes 0, 1 wrote 3 times into 2 slots
    basis = torch.eye(4, dtype=memory.region_queue.dtype)
    for cls in (0, 1):
        assert torch.equal(memory.region_queue[cls, 0], basis[2])
        assert torch.equal(memory.region_queue[cls, 1], basis[1])
    assert torch.equal(memory.region_queue[2], before[2])  # class 2 absent: untouched


def test_region_entry_is_renormalised_class_mean_without_ignored_pixels():
    memory = _memory(num_classes=2, t_ch=3)
    features = torch.zeros(1, 3, 2, 2, dtype=torch.float64)
    features[0, :, 0, 0] = torch.tensor([3.0, 0.0, 0.0])  # class 0
    features[0, :, 0, 1] = torch.tensor([0.0, 1.0, 0.0])  # class 0
    features[0, :, 1, 0] = torch.tensor([0.0, 0.0, 1.0])  # ignored
    features[0, :, 1, 1] = torch.tensor([0.0, 0.0, 2.0])  # class 1
    memory.enqueue(features, torch.tensor([[[0, 0], [255, 1]]]))
    # Each pixel is normalised first: mean([1,0,0], [0,1,0]) renormalised.
    torch.testing.assert_close(
        memory.region_queue[0, 0].double(), torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64) / 2**0.5
    )
    torch.testing.assert_close(memory.region_queue[1, 0].double(), torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))


def test_pixel_queue_fills_then_wraps_to_the_end():
    # 8 pixels of class 0 per image, at most 4 enqueued per step, queue of 10:
    # slots 0-3 (ptr 4), 4-7 (ptr 8), then 8 + 4 >= 10 so slots 6-9 and ptr 0.
    memory = _memory(num_classes=2, t_ch=8, pixel_memory_size=10, pixel_update_freq=4)
    labels = torch.zeros(1, 2, 4, dtype=torch.long)
    pointers, written = [], []
    for _ in range(4):
        memory.pixel_queue[0].zero_()  # sentinel: the slots written in this step become non-zero
        codes = torch.arange(8).reshape(1, 2, 4)
        memory.enqueue(_onehot_features(codes, 8), labels)
        changed = (memory.pixel_queue[0] != 0).any(dim=1).nonzero().flatten().tolist()
        pointers.append(int(memory.pixel_queue_ptr[0]))
        written.append(changed)
    assert pointers == [4, 8, 0, 4]
    assert written[0] == [0, 1, 2, 3]
    assert written[1] == [4, 5, 6, 7]
    assert written[3] == [0, 1, 2, 3]
    assert written[2] == [6, 7, 8, 9]
    assert memory.pixel_queue_ptr[1].item() == 0


def test_pixel_enqueue_draws_distinct_pixels_of_the_class_never_ignored_ones():
    memory = _memory(num_classes=3, t_ch=16, pixel_memory_size=30, pixel_update_freq=3)
    before = memory.pixel_queue.clone()
    codes = torch.arange(16).reshape(1, 4, 4)  # every pixel its own basis vector
    labels = torch.tensor([[[0, 0, 0, 0], [0, 1, 1, 255], [255, 255, 255, 255], [255, 255, 255, 255]]])
    memory.enqueue(_onehot_features(codes, 16), labels)
    assert memory.pixel_queue_ptr.tolist() == [3, 2, 0]  # min(count, 3) per class; class 2 absent
    basis = torch.eye(16, dtype=memory.pixel_queue.dtype)
    class0 = {int(memory.pixel_queue[0, k].argmax()) for k in range(3)}
    class1 = {int(memory.pixel_queue[1, k].argmax()) for k in range(2)}
    assert len(class0) == 3
    assert class0 <= {0, 1, 2, 3, 4}
    assert class1 == {5, 6}
    for k in range(3):
        assert torch.equal(memory.pixel_queue[0, k], basis[int(memory.pixel_queue[0, k].argmax())])
    assert torch.equal(memory.pixel_queue[0, 3:], before[0, 3:])
    assert torch.equal(memory.pixel_queue[2], before[2])


def test_pixel_enqueue_is_random_but_reproducible_with_a_generator():
    codes = torch.arange(64).reshape(1, 8, 8)
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    queues = []
    for seed in (0, 0, 1):
        memory = _memory(num_classes=1, t_ch=64, seed=seed, pixel_memory_size=16)
        memory.enqueue(_onehot_features(codes, 64), labels)
        queues.append(memory.pixel_queue[0].argmax(dim=1))
    assert torch.equal(queues[0], queues[1])
    assert not torch.equal(queues[0], queues[2])


def test_enqueue_rejects_out_of_range_labels():
    memory = _memory(num_classes=3)
    with pytest.raises(ValueError, match=r"class ids in \[0, 3\)"):
        memory.enqueue(torch.randn(1, 5, 2, 2), torch.tensor([[[0, 3], [1, 255]]]))


def test_concat_all_gather_is_identity_without_distributed():
    tensor = torch.randn(2, 3)
    assert concat_all_gather(tensor) is tensor


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        memory = _memory(num_classes=3, s_ch=4, t_ch=4, seed=0)
        teacher = _onehot_features(torch.full((1, 2, 2), rank), 4)  # rank r: basis vector r, class r
        labels = torch.full((1, 2, 2), rank)
        memory(torch.randn(1, 4, 2, 2), teacher.float(), labels)
        torch.save(memory.state_dict(), f"{out_dir}/{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_enqueue_gathers_across_ddp_ranks(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    states = [torch.load(tmp_path / f"{rank}.pt", weights_only=True) for rank in range(2)]
    for key in ("pixel_queue", "pixel_queue_ptr", "region_queue", "region_queue_ptr"):
        assert torch.equal(states[0][key], states[1][key]), key
    # Each rank's batch reached both ranks' queues: class r holds basis vector r.
    assert states[0]["region_queue_ptr"].tolist() == [1, 1, 0]
    assert states[0]["pixel_queue_ptr"].tolist() == [4, 4, 0]
    basis = torch.eye(4)
    for cls in (0, 1):
        assert torch.equal(states[0]["region_queue"][cls, 0], basis[cls])
        assert torch.equal(states[0]["pixel_queue"][cls, :4], basis[cls].expand(4, 4))


# ------------------------------------------------------------------------------------------ memory module


def test_memory_module_equals_function_and_reference_in_eval_mode():
    memory = _memory(num_classes=3, s_ch=4, t_ch=5).double().eval()
    student, teacher = _randn(2, 4, 3, 3, seed=40), _randn(2, 5, 3, 3, seed=41)
    labels = torch.randint(0, 3, (2, 6, 6), generator=torch.Generator().manual_seed(42))
    labels[1] = 255
    state = memory.generator.get_state()
    queues = (memory.pixel_queue.clone(), memory.region_queue.clone())
    got = memory(student, teacher, labels)
    assert torch.equal(memory.pixel_queue, queues[0])
    assert torch.equal(memory.region_queue, queues[1])
    memory.generator.set_state(state)
    pixels, regions = memory.sample_entries()
    # 9 // 3 + 1 = 4 pixel slots and 6 // 3 + 1 = 3 region slots per class, the same slots for each class.
    assert pixels.shape == (12, 5)
    assert regions.shape == (9, 5)
    slot = (memory.pixel_queue[0] == pixels[0]).all(dim=1).nonzero().item()
    assert torch.equal(pixels[4], memory.pixel_queue[1, slot])
    assert torch.equal(pixels[8], memory.pixel_queue[2, slot])
    with torch.no_grad():
        projected = memory.project_head(student)
    want = cirkd_memory_kl_reference(projected, teacher, labels, pixels, regions, 0.1, 1.0)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_memory_module_training_step_enqueues_then_samples():
    first, second = _memory(seed=3), _memory(seed=3)
    student, teacher = _randn(2, 4, 3, 3, seed=43).float(), _randn(2, 5, 3, 3, seed=44).float()
    labels = torch.randint(0, 3, (2, 3, 3), generator=torch.Generator().manual_seed(45))
    got = first(student, teacher, labels)
    second.enqueue(teacher, labels)
    pixels, regions = second.sample_entries()
    want = cirkd_memory_kl(second.project_head(student), teacher, labels, pixels, regions)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    assert torch.equal(first.pixel_queue, second.pixel_queue)
    assert first.pixel_queue_ptr.sum() > 0


def test_memory_module_gradients_reach_the_head_not_the_teacher():
    memory = _memory()
    student = torch.randn(2, 4, 3, 3, requires_grad=True)
    teacher = torch.randn(2, 5, 3, 3, requires_grad=True)
    p2p, p2r = memory(student, teacher, torch.randint(0, 3, (2, 3, 3)))
    (p2p + p2r).backward()
    assert teacher.grad is None
    assert student.grad is not None
    assert all(p.grad is not None for p in memory.project_head.parameters())


def test_memory_module_class_absent_and_all_ignored():
    memory = _memory(num_classes=4)
    student, teacher = torch.randn(2, 4, 3, 3, requires_grad=True), torch.randn(2, 5, 3, 3)
    p2p, p2r = memory(student, teacher, torch.ones(2, 3, 3, dtype=torch.long))  # only class 1
    assert torch.isfinite(p2p)
    assert torch.isfinite(p2r)
    assert p2p > 0
    # Class 1 has 9 pixels per image: 0 + 9 < 12 gives 9, then 9 + 9 >= 12 fills the end and resets.
    assert memory.pixel_queue_ptr.tolist() == [0, 0, 0, 0]
    assert memory.region_queue_ptr.tolist() == [0, 2, 0, 0]
    queues = memory.pixel_queue.clone(), memory.region_queue.clone()
    p2p, p2r = memory(student, teacher, torch.full((2, 3, 3), 255))
    assert p2p.item() == 0.0
    assert p2r.item() == 0.0
    (p2p + p2r).backward()
    assert torch.isfinite(student.grad).all()
    assert torch.equal(memory.pixel_queue, queues[0])
    assert torch.equal(memory.region_queue, queues[1])


def test_memory_single_pixel_images_match_reference():
    memory = _memory(num_classes=3, s_ch=4, t_ch=5).double()
    student, teacher = _randn(2, 4, 1, 1, seed=46), _randn(2, 5, 1, 1, seed=47)
    labels = torch.tensor([[[2]], [[0]]])
    other = _memory(num_classes=3, s_ch=4, t_ch=5).double()
    got = memory(student, teacher, labels)
    other.enqueue(teacher, labels)
    pixels, regions = other.sample_entries()
    assert other.pixel_queue_ptr.tolist() == [1, 0, 1]
    want = cirkd_memory_kl_reference(other.project_head(student), teacher, labels, pixels, regions)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_memory_state_dict_round_trip():
    memory = _memory(seed=5)
    memory(torch.randn(2, 4, 3, 3), torch.randn(2, 5, 3, 3), torch.randint(0, 3, (2, 3, 3)))
    state = memory.state_dict()
    for key in ("pixel_queue", "pixel_queue_ptr", "region_queue", "region_queue_ptr", "project_head.0.weight"):
        assert key in state
    assert {name for name, _ in memory.named_parameters()} == {
        "project_head.0.weight",
        "project_head.1.weight",
        "project_head.1.bias",
        "project_head.3.weight",
    }
    restored = _memory(seed=6)
    assert not torch.equal(restored.pixel_queue, memory.pixel_queue)
    restored.load_state_dict(state)
    for key, value in restored.state_dict().items():
        assert torch.equal(value, state[key]), key
    memory.eval(), restored.eval()
    memory.generator.manual_seed(7), restored.generator.manual_seed(7)
    inputs = torch.randn(2, 4, 3, 3), torch.randn(2, 5, 3, 3), torch.randint(0, 3, (2, 3, 3))
    for a, b in zip(memory(*inputs), restored(*inputs), strict=True):
        assert torch.equal(a, b)


def test_memory_queue_dtype_and_bytes():
    memory = _memory(queue_dtype=torch.bfloat16)
    assert memory.pixel_queue.dtype == memory.region_queue.dtype == torch.bfloat16
    p2p, _ = memory(torch.randn(2, 4, 3, 3), torch.randn(2, 5, 3, 3), torch.randint(0, 3, (2, 3, 3)))
    assert p2p.dtype == torch.float32
    assert torch.isfinite(p2p)
    held = sum(b.numel() * b.element_size() for name, b in memory.named_buffers() if "queue" in name)
    assert held == CIRKDMemoryLoss.queue_nbytes(3, 5, 12, 5, torch.bfloat16) == 3 * 17 * 5 * 2 + 2 * 3 * 8
    assert CIRKDMemoryLoss.queue_nbytes(150, 256, 20000, 0) == 150 * 20000 * 256 * 4 + 2400  # 3.07 GB


def test_memory_queues_start_as_unit_vectors():
    memory = _memory()
    torch.testing.assert_close(memory.pixel_queue.norm(dim=2), torch.ones(3, 12))
    torch.testing.assert_close(memory.region_queue.norm(dim=2), torch.ones(3, 5))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_classes": 0}, ValueError, "`num_classes`"),
        ({"pixel_memory_size": 0}, ValueError, "`pixel_memory_size`"),
        ({"queue_dtype": torch.int64}, TypeError, "`queue_dtype`"),
        ({"contrast_tau": 0.0}, ValueError, "`contrast_tau`"),
        ({"generator": 3}, TypeError, "`generator`"),
    ],
)
def test_memory_module_bad_settings(kwargs, error, match):
    settings = {"num_classes": 3, "student_channels": 4, "teacher_channels": 5, **TINY, **kwargs}
    with pytest.raises(error, match=match):
        CIRKDMemoryLoss(**settings)


@pytest.mark.parametrize(
    ("student", "teacher", "labels", "match"),
    [
        (torch.randn(2, 3, 3, 3), torch.randn(2, 5, 3, 3), torch.zeros(2, 3, 3, dtype=torch.long), "student_channels"),
        (torch.randn(2, 4, 3, 3), torch.randn(2, 6, 3, 3), torch.zeros(2, 3, 3, dtype=torch.long), "teacher_channels"),
        (torch.randn(2, 4, 3, 3), torch.randn(2, 5, 3, 2), torch.zeros(2, 3, 3, dtype=torch.long), "same shape"),
        (torch.randn(2, 4, 3, 3), torch.randn(2, 5, 3, 3), torch.zeros(1, 3, 3, dtype=torch.long), "batch size 2"),
        (torch.randn(2, 4, 3, 3), torch.randn(2, 5, 3, 3), torch.full((2, 3, 3), 7), r"\[0, 3\)"),
    ],
)
def test_memory_module_bad_input(student, teacher, labels, match):
    with pytest.raises(ValueError, match=match):
        _memory()(student, teacher, labels)


# ----------------------------------------------------------------------------------------------- bundle


def test_cirkd_loss_terms_weights_and_parameters():
    torch.manual_seed(0)
    criterion = CIRKDLoss(3, 4, 5, generator=torch.Generator().manual_seed(0), **TINY).double()
    reference_memory = _memory(seed=0).double()
    reference_memory.project_head.load_state_dict(criterion.memory.project_head.state_dict())
    s_logits, t_logits = _randn(2, 3, 6, 6, seed=50), _randn(2, 3, 6, 6, seed=51).requires_grad_()
    s_feat, t_feat = _randn(2, 4, 3, 3, seed=52).requires_grad_(), _randn(2, 5, 3, 3, seed=53)
    labels = torch.randint(0, 3, (2, 6, 6), generator=torch.Generator().manual_seed(54))
    total, terms = criterion(s_logits, t_logits, s_feat, t_feat, labels)
    assert set(terms) == {"kd", "minibatch", "memory_pixel", "memory_region"}
    torch.testing.assert_close(total, sum(terms.values()))
    torch.testing.assert_close(terms["kd"], cirkd_pixel_kd_reference(s_logits, t_logits, 1.0), rtol=1e-10, atol=0)
    want_mb = cirkd_minibatch_loss_reference(s_feat, t_feat, 0.1)
    torch.testing.assert_close(terms["minibatch"], want_mb, rtol=1e-10, atol=0)
    p2p, p2r = reference_memory(s_feat, t_feat, labels)
    torch.testing.assert_close(terms["memory_pixel"], 0.1 * p2p)
    torch.testing.assert_close(terms["memory_region"], 0.1 * p2r)
    total.backward()
    assert t_logits.grad is None
    assert s_feat.grad is not None
    assert {n for n, _ in criterion.named_parameters()} == {
        f"memory.{n}" for n, _ in reference_memory.named_parameters()
    }
    assert "memory.pixel_queue" in criterion.state_dict()


def test_cirkd_loss_pixel_kd_temperature_and_zero_weights():
    criterion = CIRKDLoss(3, 4, 5, kd_tau=2.0, memory_pixel_weight=0.0, memory_region_weight=0.0, **TINY)
    s_logits, t_logits = _randn(1, 3, 2, 3, seed=55), _randn(1, 3, 2, 3, seed=56)
    s_feat, t_feat = _randn(1, 4, 2, 2, seed=57), _randn(1, 5, 2, 2, seed=58)
    _, terms = criterion(s_logits, t_logits, s_feat, t_feat, torch.zeros(1, 2, 3, dtype=torch.long))
    torch.testing.assert_close(terms["kd"], cirkd_pixel_kd_reference(s_logits, t_logits, 2.0), rtol=1e-10, atol=0)
    assert terms["memory_pixel"].item() == 0.0
    assert int(criterion.memory.pixel_queue_ptr.sum()) == 0
    assert torch.autograd.gradcheck(
        lambda s: criterion(s, t_logits, s_feat, t_feat, torch.zeros(1, 2, 3, dtype=torch.long))[0],
        (s_logits.clone().requires_grad_(),),
    )


def test_cirkd_loss_bad_input():
    criterion = CIRKDLoss(3, 4, 5, **TINY)
    logits, feat_s, feat_t = torch.randn(2, 3, 4, 4), torch.randn(2, 4, 2, 2), torch.randn(2, 5, 2, 2)
    labels = torch.zeros(2, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="same shape"):
        criterion(logits, torch.randn(2, 3, 4, 5), feat_s, feat_t, labels)
    with pytest.raises(ValueError, match="batch size of the logits"):
        criterion(logits, logits, feat_s[:1], feat_t[:1], labels)
    with pytest.raises(ValueError, match="`kd_weight`"):
        CIRKDLoss(3, 4, 5, kd_weight=-1.0, **TINY)


def test_deepcopy_keeps_queues_independent():
    memory = _memory()
    clone = copy.deepcopy(memory)
    memory.enqueue(torch.randn(1, 5, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    assert clone.pixel_queue_ptr.sum() == 0
    assert memory.pixel_queue_ptr.sum() > 0


# ------------------------------------------------------------------------------------------- battery


def test_minibatch_passes_the_loss_battery():
    report = check_distillation_loss(
        CIRKDMiniBatchLoss(tau=0.1, pool=2),
        (2, 3, 3, 3),
        zero_at_equal=True,
        reference=lambda s, t: cirkd_minibatch_loss_reference(s, t, 0.1, 2),
    )
    assert {"gradcheck", "zero_at_equal", "reference", "teacher_graph", "finite"} <= set(report.passed)
    report = check_distillation_loss(CIRKDMiniBatchLoss(), (2, 3, 3, 3), teacher_shape=(2, 5, 3, 3))
    assert "gradcheck" in report.passed


def test_memory_module_passes_the_loss_battery():
    report = check_distillation_loss(
        _memory(num_classes=3, s_ch=3, t_ch=5),
        (2, 3, 3, 3),
        teacher_shape=(2, 5, 3, 3),
        with_labels=True,
        num_classes=3,
        label_shape=(2, 6, 6),
    )
    assert {"gradcheck", "deterministic", "finite", "teacher_graph", "state_dict"} <= set(report.passed)
