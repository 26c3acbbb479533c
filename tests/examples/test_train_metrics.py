"""mIoU from a confusion matrix, against plain-loop references; whole vs sliding-window inference."""

from __future__ import annotations

import math

import pytest
import torch

from segkd_examples.metrics import (
    LabelRangeError,
    check_label_range,
    confusion_matrix,
    evaluate,
    format_iou_table,
    iou_from_confusion,
    miou_from_confusion,
    predict_logits,
    slide_logits,
)


def _reference_iou(pred, target, num_classes, ignore):
    # Plain loops over pixels and classes, from the definition.
    ious = []
    pairs = [(int(p), int(t)) for p, t in zip(pred.flatten().tolist(), target.flatten().tolist(), strict=True)]
    pairs = [(p, t) for p, t in pairs if t != ignore]
    for k in range(num_classes):
        inter = sum(1 for p, t in pairs if p == k and t == k)
        union = sum(1 for p, t in pairs if p == k or t == k)
        ious.append(inter / union if union else math.nan)
    return ious


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_iou_matches_a_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    k = 5
    target = torch.randint(0, k, (2, 7, 9), generator=g)
    target[torch.rand(target.shape, generator=g) < 0.2] = 255
    target[target == 3] = 255  # class 3 absent from the labels
    pred = torch.randint(0, k, (2, 7, 9), generator=g)
    pred[pred == 4] = 0
    target[target == 4] = 0  # class 4 absent everywhere: excluded from the mean
    matrix = confusion_matrix(pred, target, k)
    expected = _reference_iou(pred, target, k, 255)
    got = iou_from_confusion(matrix).tolist()
    for a, b in zip(got, expected, strict=True):
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-12)
    valid = [v for v in expected if not math.isnan(v)]
    assert miou_from_confusion(matrix) == pytest.approx(sum(valid) / len(valid))
    assert int(matrix.sum()) == int((target != 255).sum())


def test_confusion_matrix_orientation():
    pred = torch.tensor([[0, 1, 1]])
    target = torch.tensor([[0, 0, 1]])
    assert confusion_matrix(pred, target, 2).tolist() == [[1, 1], [0, 1]]  # rows: true class


def test_shape_mismatch():
    with pytest.raises(ValueError, match=r"`pred` and `target` to have the same shape, got \(1, 2\) and \(1, 3\)"):
        confusion_matrix(torch.zeros(1, 2), torch.zeros(1, 3), 2)


def test_label_range_check():
    labels = torch.tensor([[0, 1, 255, 7, -1]])
    with pytest.raises(LabelRangeError, match=r"Found 2 label pixels .*\[0, 3\) .*first ids: \[-1, 7\]"):
        check_label_range(labels, 3)
    assert check_label_range(labels, 3, action="ignore").tolist() == [[0, 1, 255, 255, 255]]
    ok = torch.tensor([[0, 2, 255]])
    assert check_label_range(ok, 3) is ok


def test_slide_reconstructs_a_per_pixel_forward():
    # A forward that keeps the resolution and is per-pixel: any window layout must give back exactly its output.
    image = torch.randn(1, 3, 23, 37)

    def forward(x):
        return torch.cat([x, -x], dim=1)

    whole = forward(image)
    for crop, stride in [((8, 8), (5, 5)), ((16, 32), None), ((40, 40), (10, 10))]:  # last one: padded image
        torch.testing.assert_close(slide_logits(forward, image, 6, crop, stride), whole, rtol=0, atol=1e-6)


def test_slide_averages_overlaps():
    # Each window predicts its own mean pixel value; columns covered by two windows get the mean of both.
    image = torch.arange(6.0).repeat(1, 1, 4, 1)  # (1, 1, 4, 6), value = column index

    def forward(x):
        return torch.full((1, 1, *x.shape[-2:]), float(x.mean()))

    out = slide_logits(forward, image, 1, (4, 4), (4, 2))  # windows over columns 0-3 and 2-5
    expected = torch.tensor([1.5, 1.5, 2.5, 2.5, 3.5, 3.5]).repeat(1, 1, 4, 1)
    torch.testing.assert_close(out, expected)


def test_evaluate_single_process():
    k = 3
    labels = torch.tensor([[[0, 1], [2, 255]]])
    images = torch.zeros(1, 3, 2, 2)

    def forward(x):  # always predicts class 1, at half resolution
        logits = torch.zeros(x.shape[0], k, 1, 1)
        logits[:, 1] = 1.0
        return logits

    miou, iou, matrix = evaluate(forward, [(images, labels)], k, device=torch.device("cpu"))
    assert matrix.tolist() == [[0, 1, 0], [0, 1, 0], [0, 1, 0]]
    assert iou == pytest.approx([0.0, 1 / 3, 0.0])
    assert miou == pytest.approx(1 / 9)


def test_format_iou_table():
    table = format_iou_table([0.5, float("nan"), 0.25], ["road", "sky", "car"])
    assert "| road     |   50.00 |" in table
    assert "| sky      |     n/a |" in table
    assert table.splitlines()[-1] == "| **mean** |   37.50 |"


def test_miou_over_all_bins_is_cirkds_formula():
    # CIRKD utils/score.py: area_inter / (2.220446049250313e-16 + area_union), then IoU.mean() over all nclass bins.
    g = torch.Generator().manual_seed(3)
    k = 12
    matrix = torch.randint(0, 50, (k, k), generator=g)
    for empty in (2, 7, 11):  # classes never labelled nor predicted, like COCO-Stuff's 11 unused raw ids
        matrix[empty, :] = 0
        matrix[:, empty] = 0
    matrix[5, :] = 0  # never labelled but predicted: IoU 0 in both averages
    m = matrix.double().numpy()
    inter = [m[c, c] for c in range(k)]
    union = [m[c, :].sum() + m[:, c].sum() - m[c, c] for c in range(k)]
    cirkd = sum(i / (2.220446049250313e-16 + u) for i, u in zip(inter, union, strict=True)) / k
    assert miou_from_confusion(matrix, "all") == pytest.approx(cirkd, rel=1e-12, abs=0)
    present = [i / u for i, u in zip(inter, union, strict=True) if u > 0]
    assert miou_from_confusion(matrix) == pytest.approx(sum(present) / len(present), rel=1e-12)
    assert miou_from_confusion(matrix, "all") == pytest.approx(miou_from_confusion(matrix) * 9 / 12, rel=1e-12)
    with pytest.raises(ValueError, match="`classes`"):
        miou_from_confusion(matrix, "some")
    iou = iou_from_confusion(matrix)
    mean_line = format_iou_table(iou, miou_classes="all").splitlines()[-1]
    assert mean_line.split("|")[2].strip() == f"{100 * cirkd:.2f}"


def test_predict_logits_align_corners():
    # 2x2 -> 5x5: with align_corners=True the samples are at 0, 1/4, 1/2, 3/4, 1 (corners kept);
    # with False at (i + 0.5) * 2/5 - 0.5 = -0.3, 0.1, 0.5, 0.9, 1.3, clamped to [0, 1].
    x = torch.tensor([[[[1.0, 3.0], [5.0, 13.0]]]], dtype=torch.float64)

    def expected(coords):
        out = torch.empty(5, 5, dtype=torch.float64)
        for i, y in enumerate(coords):
            for j, xx in enumerate(coords):
                top = (1 - xx) * 1.0 + xx * 3.0
                bottom = (1 - xx) * 5.0 + xx * 13.0
                out[i, j] = (1 - y) * top + y * bottom
        return out

    true = predict_logits(lambda t: t, x, (5, 5), align_corners=True)[0, 0].double()
    false = predict_logits(lambda t: t, x, (5, 5), align_corners=False)[0, 0].double()
    assert torch.allclose(true, expected([0, 0.25, 0.5, 0.75, 1]), atol=1e-6)
    assert torch.allclose(false, expected([0, 0.1, 0.5, 0.9, 1]), atol=1e-6)
    assert float((true - false).abs().max()) > 0.5


@pytest.mark.parametrize("align_corners", [True, False])
def test_training_ce_follows_align_corners(align_corners):
    from torch import nn

    from segkd_examples.engine import DistillationStep
    from segkd_examples.models import SegmentationOutput

    logits = torch.tensor([[[[1.0, 3.0], [5.0, 13.0]], [[0.0, 2.0], [4.0, -6.0]]]])  # (1, 2, 2, 2)

    class Fixed(nn.Module):
        def forward(self, images):
            return SegmentationOutput(logits, None, logits)

    labels = torch.tensor([[[0, 1, 0, 1, 255]] * 5])
    step = DistillationStep(Fixed(), nn.Identity(), aux_weight=0.0, ignore_index=255, align_corners=align_corners)
    loss, _ = step(torch.zeros(1, 3, 5, 5), labels, None)
    coords = [0, 0.25, 0.5, 0.75, 1] if align_corners else [0, 0.1, 0.5, 0.9, 1]
    total, count = 0.0, 0
    for i, y in enumerate(coords):
        for j, x in enumerate(coords):
            label = int(labels[0, i, j])
            if label == 255:
                continue
            z = [
                (1 - y) * ((1 - x) * float(c[0, 0]) + x * float(c[0, 1]))
                + y * ((1 - x) * float(c[1, 0]) + x * float(c[1, 1]))
                for c in logits[0]
            ]
            total += math.log(sum(math.exp(v) for v in z)) - z[label]
            count += 1
    assert float(loss) == pytest.approx(total / count, rel=1e-5)


def test_cached_val_images_equal_the_loader(tmp_path):
    # Decoded once and normalised on the device: bitwise the loader's batches (real-dataset path: uint8 cache).
    from test_data import make_cityscapes

    from segkd_examples.data import build_dataset
    from segkd_examples.evalcache import CachedValImages

    make_cityscapes(tmp_path)
    val = build_dataset("cityscapes", tmp_path, "val")
    loader = torch.utils.data.DataLoader(val, batch_size=1)
    cached = CachedValImages(val, range(len(val)), device=torch.device("cpu"))
    for _ in range(2):  # the second pass comes from memory
        pairs = list(zip(loader, cached, strict=True))
        assert len(pairs) == len(val)
        for (image, label), (image_c, label_c) in pairs:
            assert image_c.dtype == image.dtype
            assert label_c.dtype == label.dtype
            assert torch.equal(image_c, image)
            assert torch.equal(label_c, label)
    assert all(item[0].dtype == torch.uint8 for item in cached._items)


def test_evaluate_all_bins_equals_cirkds_histogram_score():
    # CIRKD utils/score.py batch_intersection_union on the upsampled logits, written from its code: shift labels
    # and predictions by +1 (ignored pixels -> 0), zero the predictions on ignored pixels, histc over [1, K] with K
    # bins for intersection, prediction and label; IoU = inter / (eps + union) summed over images, then the mean.
    g = torch.Generator().manual_seed(5)
    k = 10  # classes 3 and 8 never occur and are never predicted (the logits make them lose)
    batches = []
    for _ in range(3):
        labels = torch.randint(0, k, (1, 12, 16), generator=g)
        labels[(labels == 3) | (labels == 8)] = 255
        labels[torch.rand(labels.shape, generator=g) < 0.1] = 255
        batches.append((torch.randn(1, 3, 12, 16, generator=g), labels))
    weight = torch.randn(k, 3, generator=g)

    def forward(x):
        logits = torch.einsum("kc,nchw->nkhw", weight, x[:, :, ::4, ::4])
        logits[:, [3, 8]] = -1e4
        return logits

    inter_sum, union_sum = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
    for images, labels in batches:
        up = torch.nn.functional.interpolate(forward(images), labels.shape[-2:], mode="bilinear", align_corners=True)
        target = torch.where(labels == 255, -1, labels).double() + 1
        predict = (up.argmax(1) + 1).double() * (target > 0).double()
        intersection = predict * (predict == target).double()
        area_inter = torch.histc(intersection, bins=k, min=1, max=k)
        area_pred = torch.histc(predict, bins=k, min=1, max=k)
        area_lab = torch.histc(target, bins=k, min=1, max=k)
        inter_sum += area_inter
        union_sum += area_pred + area_lab - area_inter
    cirkd = float((inter_sum / (2.220446049250313e-16 + union_sum)).mean())
    miou, iou, _ = evaluate(forward, batches, k, device=torch.device("cpu"), align_corners=True, miou_classes="all")
    assert miou == pytest.approx(cirkd, rel=1e-12)
    assert math.isnan(iou[3])
    assert math.isnan(iou[8])
    present, _, _ = evaluate(forward, batches, k, device=torch.device("cpu"), align_corners=True)
    assert present == pytest.approx(cirkd * k / (k - 2), rel=1e-12)
