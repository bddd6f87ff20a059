"""Per-example preprocessing: image decoding, ALIGN/CLIP-style image transforms, caption choice,
tokenisation.

Evaluation transforms are exactly :func:`altjax.processing.preprocess_image` (the reference
processors' resize + centre crop + rescale/normalise). Training adds a random crop, drawn from a
NumPy generator the pipeline seeds per example, so a run is reproducible. There is no random
horizontal flip: captions say "left of" and "on the right", which a flip would make false.
"""
from __future__ import annotations

import dataclasses
import io
import math
from typing import Any, Sequence

import numpy as np
from PIL import Image

from altjax.processing import (ALIGN_BASE_IMAGE_CONFIG, ImageProcessorConfig, _pil_to_rgb, _resize_shape,
                               _rgb_uint8, preprocess_image)

AUGMENTATIONS = (None, "random_crop", "random_resized_crop")


def decode_image(value: Any) -> np.ndarray:
    """Encoded image bytes (JPEG, PNG, WebP, ...), a PIL image or a uint8 array -> uint8 (H, W, 3).

    Non-RGB images become RGB as in :mod:`altjax.processing` (transparency composited onto white).
    Raises (OSError, ValueError, ...) on bytes that do not decode to a whole image: a truncated
    file is an error, not a partly grey image.
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        image = Image.open(io.BytesIO(value))
        image.load()
        return _pil_to_rgb(image)
    if isinstance(value, Image.Image):
        return _pil_to_rgb(value)
    return _rgb_uint8(value, True)


def align_image_config(image_size: int = 289) -> ImageProcessorConfig:
    """ALIGN's preprocessing (align-base: bilinear resize to a square, centre crop, x / 127.5 - 1)
    at any size, the resize keeping align-base's 346 : 289 ratio."""
    resize = round(image_size * 346 / 289)
    return ImageProcessorConfig.from_dict(
        {**ALIGN_BASE_IMAGE_CONFIG, "size": {"height": resize, "width": resize},
         "crop_size": {"height": image_size, "width": image_size}}, "EfficientNetImageProcessor")


def clip_image_config(image_size: int = 224) -> ImageProcessorConfig:
    """CLIP's preprocessing (bicubic resize of the shortest edge, centre crop, OpenAI mean/std)."""
    return ImageProcessorConfig.from_dict(
        {"size": {"shortest_edge": image_size}, "crop_size": {"height": image_size, "width": image_size}},
        "CLIPImageProcessor")


def _output_size(config: ImageProcessorConfig) -> tuple[int, int]:
    if not config.do_center_crop:
        raise ValueError("random crops need a fixed output size: use a config with do_center_crop "
                         "(its crop_size is the training image size)")
    return config.crop_size["height"], config.crop_size["width"]


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator,
                            scale: tuple[float, float], ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """(top, left, crop height, crop width) of an Inception-style crop: area a uniform fraction
    ``scale`` of the image, aspect ratio log-uniform in ``ratio``; after 10 failed draws, the
    largest centred crop within ``ratio`` (torchvision's RandomResizedCrop sampling)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


@dataclasses.dataclass(frozen=True)
class ImageTransform:
    """uint8 image -> float32 (H, W, 3) model input.

    ``augment``:
      * None: the evaluation transform, :func:`altjax.processing.preprocess_image` with ``config``.
      * ``"random_crop"`` (ALIGN: resize to 346 then a random 289 crop): resize as ``config``
        says, then a uniformly placed ``crop_size`` crop instead of the centre one.
      * ``"random_resized_crop"`` (CLIP-style): a crop of a random fraction ``scale`` of the area
        and aspect ratio in ``ratio``, resized to ``crop_size`` with ``config.resample``.
    Rescaling and normalisation follow ``config`` in every case.
    """

    config: ImageProcessorConfig
    augment: str | None = None
    scale: tuple[float, float] = (0.9, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __post_init__(self):
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {self.augment!r}")
        if self.augment is not None:
            _output_size(self.config)

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of the transformed images."""
        if self.config.do_center_crop:
            return self.config.crop_size["height"], self.config.crop_size["width"]
        if "shortest_edge" in self.config.size:
            raise ValueError("a shortest-edge resize without a centre crop gives images of varying shape")
        return self.config.size["height"], self.config.size["width"]

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        config = self.config
        if self.augment is None:
            return preprocess_image(image, config)
        out_h, out_w = _output_size(config)
        if self.augment == "random_crop":
            if config.do_resize:
                h, w = _resize_shape(image.shape[0], image.shape[1], config.size)
                image = np.asarray(Image.fromarray(image).resize((w, h), resample=config.resample))
            h, w = image.shape[:2]
            if h < out_h or w < out_w:
                # As the centre crop: zero padding around an image smaller than the crop.
                padded = np.zeros((max(h, out_h), max(w, out_w), 3), np.uint8)
                top, left = (padded.shape[0] - h) // 2, (padded.shape[1] - w) // 2
                padded[top:top + h, left:left + w] = image
                image, h, w = padded, padded.shape[0], padded.shape[1]
            top, left = int(rng.integers(0, h - out_h + 1)), int(rng.integers(0, w - out_w + 1))
            image = image[top:top + out_h, left:left + out_w]
        else:
            top, left, h, w = random_resized_crop_box(image.shape[0], image.shape[1], rng, self.scale, self.ratio)
            image = np.asarray(Image.fromarray(image).resize(
                (out_w, out_h), resample=config.resample, box=(left, top, left + w, top + h)))
        return preprocess_image(image, dataclasses.replace(config, do_resize=False, do_center_crop=False))


class EmptyCaptionError(ValueError):
    """A record whose caption is empty or whitespace only (or that has no caption at all)."""


def _blank(value: Any) -> bool:
    return isinstance(value, (str, bytes)) and not value.strip()


def choose_caption(value: Any, rng: np.random.Generator) -> str:
    """A caption from a field: str or UTF-8 bytes as they are; from a list or array of captions
    (COCO has five per image), one drawn with ``rng`` among those that are not empty.

    Raises :class:`EmptyCaptionError` (a ValueError) when the caption is empty or whitespace only,
    or every caption of the list is: such a record is skipped and counted by the pipeline, as an
    unreadable image is. ValueError for anything else that is not a caption.
    """
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if not value:
            raise EmptyCaptionError("the record has no caption")
        usable = [v for v in value if not _blank(v)]
        if not usable:
            raise EmptyCaptionError(f"all {len(value)} captions are empty or whitespace only")
        # Without empty captions ``usable`` is the list itself: the same draw as ever.
        value = usable[int(rng.integers(len(usable)))]
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, str):
        if not value.strip():
            raise EmptyCaptionError("empty caption" if not value else f"whitespace-only caption {value!r}")
        return value
    if isinstance(value, dict) and "caption" in value:
        return choose_caption(value["caption"], rng)
    raise ValueError(f"not a caption: {type(value).__name__}")


@dataclasses.dataclass(frozen=True)
class TextField:
    """One tokenised text of each batch: the record field ``key`` (None: the source's caption
    key), tokenised by ``tokenizer`` (a Hugging Face tokenizer) padded/truncated to
    ``max_length``, output as ``{prefix}input_ids``, ``{prefix}attention_mask`` and, where the
    tokenizer makes them, ``{prefix}token_type_ids``. Several fields give parallel texts (e.g.
    English and Chinese captions of the same image, for AltCLIP's distillation)."""

    tokenizer: Any
    key: str | None = None
    max_length: int = 64
    prefix: str = ""


def tokenize(texts: Sequence[str], field: TextField) -> dict[str, np.ndarray]:
    """Batch tokenisation to int32 arrays (B, max_length)."""
    encoded = field.tokenizer(list(texts), padding="max_length", truncation=True,
                              max_length=field.max_length, return_tensors="np")
    keys = ("input_ids", "attention_mask", "token_type_ids")
    return {f"{field.prefix}{k}": np.asarray(encoded[k], np.int32) for k in keys if k in encoded}
