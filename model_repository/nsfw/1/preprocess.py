"""ViTImageProcessor's preprocessing in numpy/PIL, driven by the exporter's nsfw.json.

Kept beside model.py (the Python backend puts this folder on sys.path) and imported by the
exporter's parity check, so the served preprocessing is the one that was checked.
"""

import numpy as np
from PIL import Image

RESAMPLE = {
    "nearest": Image.NEAREST,
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "lanczos": Image.LANCZOS,
}


class Preprocessor:
    def __init__(self, spec):
        self.height, self.width = (int(v) for v in spec["image_size"])
        self.resample = RESAMPLE[spec["resample"]]
        # Rescale and normalisation folded into one multiply-add, tabled for the 256 values of
        # each channel: a lookup per pixel, the same float32 values, a quarter of the time.
        mean = np.asarray(spec["image_mean"], dtype=np.float32)
        std = np.asarray(spec["image_std"], dtype=np.float32)
        scale = (float(spec["rescale_factor"]) / std).astype(np.float32)
        offset = (-mean / std).astype(np.float32)
        self.table = np.ascontiguousarray(
            (np.arange(256, dtype=np.float32)[:, None] * scale + offset).T
        )

    def __call__(self, images):
        """uint8 HWC RGB arrays of any size -> float32 NCHW batch."""
        batch = np.empty((len(images), 3, self.height, self.width), dtype=np.float32)
        for i, image in enumerate(images):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"expected an HxWx3 uint8 image, got {image.dtype} {image.shape}")
            resized = Image.fromarray(image).resize(
                (self.width, self.height), resample=self.resample, reducing_gap=None
            )
            channels = np.asarray(resized).transpose(2, 0, 1)
            for c in range(3):
                np.take(self.table[c], channels[c], out=batch[i, c])
        return batch


def softmax(logits):
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)
