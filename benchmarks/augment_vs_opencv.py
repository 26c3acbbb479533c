"""How far the pipeline's decoding and random scaling are from the HWD authors' OpenCV calls, pixel by pixel.

The authors' ``dataset/datasets.py`` decodes with ``cv2.imread`` and scales with ``cv2.resize(..., fx=s, fy=s)``
(``INTER_LINEAR`` for the image, ``INTER_NEAREST`` for the label); the pipeline decodes with Pillow and resamples
the crop window itself (``segkd_examples.data.transforms``). This script needs OpenCV, which segkd does not:

    pip install opencv-python-headless
    python benchmarks/augment_vs_opencv.py

It writes a synthetic 1024 x 2048 JPEG (smooth colour, noise and flat blocks with sharp edges) and prints, for
decoding and for each scale of the authors' set that it tries, the largest and mean absolute difference of the
images (0-255 scale) and the share of label pixels that differ.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from segkd_examples.data.transforms import _resample_window, nearest_taps


def synthetic_photo(height: int, width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An RGB ``uint8`` image with texture and edges, and a label map of 16 x 16 blocks."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([128 + 100 * np.sin(x / 97.0 + c) * np.cos(y / 53.0 - c) for c in range(3)], axis=-1)
    image = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    for _ in range(60):
        top, left = rng.integers(0, height - 100), rng.integers(0, width - 200)
        image[top : top + rng.integers(20, 100), left : left + rng.integers(20, 200)] = rng.integers(0, 256, 3)
    label = rng.integers(0, 19, (height // 16, width // 16)).repeat(16, 0).repeat(16, 1).astype(np.uint8)
    return image, label


def main() -> None:
    import cv2

    image, label = synthetic_photo(1024, 2048)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "image.jpg"
        Image.fromarray(image).save(path, quality=90)
        with Image.open(path) as img:
            pillow = np.asarray(img.convert("RGB"))
        opencv = cv2.imread(str(path), cv2.IMREAD_COLOR)[..., ::-1]
    diff = np.abs(pillow.astype(int) - opencv.astype(int))
    print(f"cv2 {cv2.__version__}, Pillow {Image.__version__}")
    print(f"decode JPEG: max {diff.max()}, mean {diff.mean():.4f}, pixels differing {(diff > 0).mean():.2%}")
    height, width = label.shape
    for scale in (0.5, 0.7, 1.3, 2.0):
        reference = cv2.resize(pillow, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR).astype(np.float32)
        reference_label = cv2.resize(label, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
        new_h, new_w = reference_label.shape
        ours = _resample_window(pillow, (0, new_h), (0, new_w), (new_h, new_w))
        rows, cols = nearest_taps(0, new_h, height, new_h), nearest_taps(0, new_w, width, new_w)
        ours_label = label[rows[:, None], cols[None, :]]
        gap = np.abs(ours - reference)
        print(
            f"scale {scale}: image max {gap.max():.2f}, mean {gap.mean():.3f}; "
            f"label pixels differing {(ours_label != reference_label).mean():.2%}"
        )


if __name__ == "__main__":
    main()
