"""Processors for ALIGN, AltCLIP and CLIP: a Hugging Face tokenizer plus image preprocessing in NumPy + PIL.

The image pipeline reproduces transformers' PIL backend (``EfficientNetImageProcessorPil``,
``CLIPImageProcessorPil``) bit for bit. The resize has to be PIL's on the uint8 image: a float
resize (``jax.image.resize``) or torchvision's (transformers' default backend when torchvision is
installed) gives pixels one or more uint8 levels away, and the image towers see different inputs.

Two deliberate departures from the reference, both for images it would not turn into 3 channels:
greyscale, palette, RGBA and other non-RGB images are always converted to RGB (alpha composited
onto white, as transformers' ``convert_to_rgb`` does), where the EfficientNet processor (which
leaves ``do_convert_rgb`` unset) would return 1 or 4 channels, palette indices, or fail. RGB
images are processed exactly as the reference does. NumPy arrays are always read as (H, W, C),
where the reference guesses the channel axis and misreads images 1, 3 or 4 pixels high.

``pixel_values`` come out NHWC float32 (B, H, W, 3): the reference's NCHW moved to channels-last.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np
from PIL import Image

from altjax import hub

IMAGE_CONFIG_NAME = "preprocessor_config.json"
PROCESSOR_CONFIG_NAME = "processor_config.json"
# Tokenizer and image-processor files a model directory may carry: what a processor reads, what is
# fetched of a Hub repo for it, and what is copied along with a model's weights.
PROCESSOR_FILES = (
    IMAGE_CONFIG_NAME,
    PROCESSOR_CONFIG_NAME,
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "sentencepiece.bpe.model",
    "vocab.json",
    "merges.txt",
)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)

# Class attributes of the two reference processors (transformers 5.23). Keys absent from a type's
# table are not options of that processor: a config file that sets them keeps them in `extra`.
CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "EfficientNetImageProcessor": dict(
        do_convert_rgb=None, do_resize=True, size={"height": 346, "width": 346}, resample=3,
        do_center_crop=False, crop_size={"height": 289, "width": 289}, do_rescale=True,
        rescale_factor=1 / 255, rescale_offset=False, do_normalize=True,
        image_mean=IMAGENET_STANDARD_MEAN, image_std=IMAGENET_STANDARD_STD, include_top=True,
    ),
    "CLIPImageProcessor": dict(
        do_convert_rgb=True, do_resize=True, size={"shortest_edge": 224}, resample=3,
        do_center_crop=True, crop_size={"height": 224, "width": 224}, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
    ),
}
# An int `size` means a square for EfficientNet and the shortest edge for CLIP (`default_to_square`).
_DEFAULT_TO_SQUARE = {"EfficientNetImageProcessor": True, "CLIPImageProcessor": False}

# kakaobrain/align-base's preprocessor_config.json: the settings ALIGN was trained with. They differ
# from the EfficientNet class defaults (bilinear, centre crop, x/127.5 - 1, no normalisation).
ALIGN_BASE_IMAGE_CONFIG: dict[str, Any] = dict(
    image_processor_type="EfficientNetImageProcessor", size={"height": 346, "width": 346}, resample=2,
    do_center_crop=True, crop_size={"height": 289, "width": 289}, do_rescale=True,
    rescale_factor=1 / 127.5, rescale_offset=True, do_normalize=False,
    image_mean=IMAGENET_STANDARD_MEAN, image_std=IMAGENET_STANDARD_STD, include_top=False,
)


def _size_dict(size: Any, default_to_square: bool, name: str) -> dict[str, int]:
    """A `size`/`crop_size` value as the dict transformers' `get_size_dict` makes of it."""
    if isinstance(size, Mapping):
        size = dict(size)
    elif isinstance(size, int):
        size = {"height": size, "width": size} if default_to_square else {"shortest_edge": size}
    elif isinstance(size, (tuple, list)) and len(size) == 2:
        size = {"height": size[0], "width": size[1]}
    if not (isinstance(size, dict) and set(size) in ({"height", "width"}, {"shortest_edge"})):
        raise ValueError(f"{name} must be an int, (height, width) or a dict with keys height and width or "
                         f"shortest_edge (the only forms ALIGN and CLIP processors use), got {size!r}")
    return {k: int(v) for k, v in size.items()}


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
    """The options of an HF ``EfficientNetImageProcessor`` or ``CLIPImageProcessor``.

    Field names are the ``preprocessor_config.json`` keys. Use :meth:`from_dict` to get the
    reference's class defaults for the keys a file leaves out.
    """

    image_processor_type: str
    do_convert_rgb: bool | None
    do_resize: bool
    size: dict[str, int]
    resample: int
    do_center_crop: bool
    crop_size: dict[str, int]
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    image_mean: float | tuple[float, ...]
    image_std: float | tuple[float, ...]
    rescale_offset: bool = False
    include_top: bool = False
    extra: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], default_type: str) -> "ImageProcessorConfig":
        """Reads a preprocessor config; missing or null keys take the class defaults of its type.

        The type is ``d["image_processor_type"]`` (its ``Fast``/``Pil`` suffix dropped) or
        ``default_type``.
        """
        kind = str(d.get("image_processor_type") or default_type).removesuffix("Fast").removesuffix("Pil")
        if kind not in CLASS_DEFAULTS:
            raise ValueError(f"unsupported image_processor_type {kind!r}; "
                             f"expected one of {sorted(CLASS_DEFAULTS)}")
        defaults = CLASS_DEFAULTS[kind]
        # As in transformers, an explicit null takes the class default.
        values = {k: (d[k] if d.get(k) is not None else v) for k, v in defaults.items()}
        square = d.get("default_to_square", _DEFAULT_TO_SQUARE[kind])
        values["size"] = _size_dict(values["size"], square, "size")
        values["crop_size"] = _size_dict(values["crop_size"], True, "crop_size")
        values["resample"] = int(values["resample"])
        for k in ("image_mean", "image_std"):
            v = values[k]
            values[k] = tuple(float(x) for x in v) if isinstance(v, Sequence) else float(v)
        # processor_class names the processor, not these options; save_pretrained writes it afresh.
        own = set(defaults) | {"image_processor_type", "processor_class"}
        extra = {k: v for k, v in d.items() if k not in own}
        return cls(image_processor_type=kind, extra=extra, **values)

    def to_dict(self) -> dict[str, Any]:
        """The ``preprocessor_config.json`` content, loadable by transformers' image processors."""
        out = {k: getattr(self, k) for k in CLASS_DEFAULTS[self.image_processor_type]}
        out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items() if v is not None}
        return {**self.extra, **out, "image_processor_type": self.image_processor_type}


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    # transformers' convert_to_rgb: transparency is composited onto white, not dropped.
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return np.asarray(image.convert("RGB"))


def _array_to_rgb(image: np.ndarray) -> np.ndarray:
    # transformers' convert_to_rgb for uint8 arrays; the blend is float64 and rounds half to even.
    channels = image.shape[-1]
    if channels == 1:
        return np.repeat(image, 3, axis=-1)
    if channels == 4:
        alpha = image[..., 3:4] / 255
        return np.round(alpha * image[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return image


def _rgb_uint8(image: Any, convert_rgb: bool) -> np.ndarray:
    """One input image as a uint8 (H, W, 3) array."""
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image) if convert_rgb or image.mode != "RGB" else np.asarray(image)
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f"image arrays must be uint8 (H, W, C) or (H, W), got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image arrays must be (H, W) or (H, W, C) with C in 1, 3, 4, "
                         f"got shape {image.shape}")
    return _array_to_rgb(image)


def _resize_shape(height: int, width: int, size: dict[str, int]) -> tuple[int, int]:
    if "shortest_edge" not in size:
        return size["height"], size["width"]
    # transformers' get_resize_output_image_size: the long side is truncated, not rounded.
    edge = size["shortest_edge"]
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(edge * long / short)
    return (new_long, edge) if width <= height else (edge, new_long)


def _center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    h, w = image.shape[:2]
    if h < height or w < width:
        # The reference zero-pads an image smaller than the crop, an odd pixel going on top/left.
        top, left = max(0, -(-(height - h) // 2)), max(0, -(-(width - w) // 2))
        padded = np.zeros((max(h, height), max(w, width), image.shape[2]), image.dtype)
        padded[top:top + h, left:left + w] = image
        image, h, w = padded, padded.shape[0], padded.shape[1]
    top, left = (h - height) // 2, (w - width) // 2
    return image[top:top + height, left:left + width]


def _normalize(image: np.ndarray, mean, std) -> np.ndarray:
    # As transformers' normalize: float32 operands, subtract then divide.
    if not np.issubdtype(image.dtype, np.floating):
        image = image.astype(np.float32)
    mean = np.broadcast_to(np.asarray(mean, dtype=image.dtype), (3,))
    std = np.broadcast_to(np.asarray(std, dtype=image.dtype), (3,))
    return (image - mean) / std


def preprocess_image(image: Any, config: ImageProcessorConfig) -> np.ndarray:
    """One PIL image or uint8 (H, W[, C]) array -> float32 (H, W, 3), as the reference PIL backend."""
    x = _rgb_uint8(image, bool(config.do_convert_rgb))
    if config.do_resize:
        height, width = _resize_shape(x.shape[0], x.shape[1], config.size)
        x = np.asarray(Image.fromarray(x).resize((width, height), resample=config.resample))
    if config.do_center_crop:
        x = _center_crop(x, config.crop_size["height"], config.crop_size["width"])
    if config.do_rescale:
        # float64 product, then float32, as transformers' rescale; the offset is a float32 subtraction.
        x = (x.astype(np.float64) * config.rescale_factor).astype(np.float32)
        if config.rescale_offset:
            x -= 1
    if config.do_normalize:
        x = _normalize(x, config.image_mean, config.image_std)
    if config.include_top:
        x = _normalize(x, 0.0, config.image_std)
    return x.astype(np.float32, copy=False)


def preprocess_images(images: Any, config: ImageProcessorConfig) -> np.ndarray:
    """Images -> ``pixel_values`` float32 (B, H, W, 3).

    ``images`` is a PIL image, a uint8 array (H, W), (H, W, C) or a batch (B, H, W, C), or a
    list of these.
    """
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    elif not isinstance(images, (list, tuple)):
        images = [images]
    if not images:
        raise ValueError("no images given")
    out = [preprocess_image(image, config) for image in images]
    shapes = {x.shape for x in out}
    if len(shapes) > 1:
        raise ValueError(f"preprocessed images differ in shape {sorted(shapes)}; enable do_center_crop "
                         "or a fixed size to batch them")
    return np.stack(out)


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("altjax processors load their tokenizer with Hugging Face transformers: "
                          "pip install transformers") from None
    return transformers


# The keys of transformers' TextKwargs (transformers.processing_utils, a module that imports torch
# wherever torch is installed); tests/test_processing.py checks them against it.
TEXT_KWARGS = frozenset({
    "add_special_tokens", "is_split_into_words", "max_length", "pad_to_multiple_of", "padding", "padding_side",
    "return_attention_mask", "return_length", "return_mm_token_type_ids", "return_offsets_mapping",
    "return_overflowing_tokens", "return_special_tokens_mask", "return_tensors", "return_text_replacement_offsets",
    "return_token_type_ids", "sanitize_control_tokens", "stride", "text_pair", "text_pair_target", "text_target",
    "truncation", "verbose"})


def load_tokenizer(directory: str, default_class: str | None = None):
    """The tokenizer of ``directory``: the transformers class its ``tokenizer_config.json`` names,
    else ``default_class``, else (neither given, or not a transformers class) AutoTokenizer's pick."""
    transformers = _transformers()
    named = (_read_json(os.path.join(directory, "tokenizer_config.json")) or {}).get("tokenizer_class")
    # AutoTokenizer imports transformers' model-configuration code, and with it torch wherever torch
    # is installed (seconds and hundreds of modules); the named class loads the same tokenizer without.
    cls = getattr(transformers, named or default_class or "", None)
    return (cls or transformers.AutoTokenizer).from_pretrained(directory)


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def processor_dir(name_or_path: str | os.PathLike, *, revision: str | None = None,
                  cache_dir: str | os.PathLike | None = None) -> str:
    """The local directory of ``name_or_path``: itself, or the snapshot of a Hub id holding its
    processor files (``hub.HubError`` when it cannot be had)."""
    return hub.resolve(name_or_path, select=lambda files: [f for f in files if f in PROCESSOR_FILES],
                       markers=PROCESSOR_FILES, revision=revision, cache_dir=cache_dir, what="processor")


def image_settings(directory: str) -> dict | None:
    """The image-processor settings of a directory, from the file transformers 5 reads first: the
    ``image_processor`` entry of ``processor_config.json``, else ``preprocessor_config.json``;
    None when it has neither."""
    nested = (_read_json(os.path.join(directory, PROCESSOR_CONFIG_NAME)) or {}).get("image_processor")
    return nested if nested is not None else _read_json(os.path.join(directory, IMAGE_CONFIG_NAME))


@dataclasses.dataclass
class _DualEncoderProcessor:
    """Tokenizer + image preprocessing; the subclasses only set the class-level settings."""

    tokenizer: Any
    image_config: ImageProcessorConfig

    image_processor_type: ClassVar[str]
    default_image_config: ClassVar[Mapping[str, Any]]
    tokenizer_class: ClassVar[str]
    text_defaults: ClassVar[Mapping[str, Any]]

    def __post_init__(self):
        # A tokenizers-backed tokenizer keeps the padding/truncation of its last call in its
        # backend, and save_pretrained would write it into tokenizer.json, where transformers reads
        # it back as default max_length etc. Remember the loaded state so that saving restores it.
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        self._backend_state = None if backend is None else (backend.padding, backend.truncation)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None):
        """Loads the tokenizer and the image settings of an HF or altjax model directory, or of a
        Hugging Face Hub id (``org/name``: its processor files, fetched into the Hub cache or found
        there offline; ``revision`` and ``cache_dir`` apply to it, see :mod:`altjax.hub`).

        The image settings are read as transformers 5 reads them: the ``image_processor`` entry of
        ``processor_config.json`` (what transformers 5 writes), else ``preprocessor_config.json``,
        else :attr:`default_image_config`. The tokenizer is loaded with transformers: the class
        named in ``tokenizer_config.json``, else :attr:`tokenizer_class`.
        """
        directory = processor_dir(name_or_path, revision=revision, cache_dir=cache_dir)
        image = image_settings(directory)
        if image is None:
            image = cls.default_image_config
        tokenizer = load_tokenizer(directory, cls.tokenizer_class)
        return cls(tokenizer, ImageProcessorConfig.from_dict(image, cls.image_processor_type))

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Writes the image settings as ``preprocessor_config.json`` and, nested as transformers 5
        writes them, ``processor_config.json``, and the tokenizer files (transformers can load all).
        Both settings files are written, the same: a ``processor_config.json`` already in the
        directory (copied along with a model) would otherwise take precedence with other settings."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        name = type(self).__name__
        for file, content in ((IMAGE_CONFIG_NAME, {**self.image_config.to_dict(), "processor_class": name}),
                              (PROCESSOR_CONFIG_NAME, {"image_processor": self.image_config.to_dict(),
                                                       "processor_class": name})):
            with open(os.path.join(directory, file), "w", encoding="utf-8") as f:
                json.dump(content, f, indent=2, sort_keys=True)
        if self._backend_state is not None:
            backend = self.tokenizer.backend_tokenizer
            padding, truncation = self._backend_state
            backend.no_padding() if padding is None else backend.enable_padding(**padding)
            backend.no_truncation() if truncation is None else backend.enable_truncation(**truncation)
        self.tokenizer.save_pretrained(directory)

    def _text_kwargs(self, call_kwargs: dict[str, Any]) -> dict[str, Any]:
        # transformers' ProcessorMixin._merge_kwargs: the processor's defaults, overridden by the
        # text options the tokenizer was built with (e.g. a max_length read from tokenizer.json),
        # overridden by the call's arguments.
        kwargs = dict(self.text_defaults)
        init = self.tokenizer.init_kwargs
        for key in TEXT_KWARGS & init.keys():
            kwargs[key] = getattr(self.tokenizer, key, init[key])
        kwargs.update(call_kwargs)
        return kwargs

    def __call__(self, text=None, images=None, *, padding=None, truncation=None, max_length=None,
                 return_tensors: str | None = "np", **tokenizer_kwargs) -> dict[str, Any]:
        """Tokenises ``text`` and preprocesses ``images``, as the transformers processor does.

        ``padding``, ``truncation`` and ``max_length`` left as None take the processor's defaults;
        other keyword arguments go to the tokenizer. Returns a dict with the tokenizer's outputs
        and ``pixel_values`` float32 (B, H, W, 3). ``return_tensors`` is "np" (arrays) or None
        (the tokenizer's lists; ``pixel_values`` is an array either way).
        """
        if text is None and images is None:
            raise ValueError("pass text, images or both")
        if return_tensors not in ("np", None):
            raise ValueError(f"return_tensors must be 'np' or None, got {return_tensors!r}")
        out: dict[str, Any] = {}
        if text is not None:
            given = dict(padding=padding, truncation=truncation, max_length=max_length)
            call = {k: v for k, v in given.items() if v is not None} | tokenizer_kwargs
            encoded = self.tokenizer(text, **self._text_kwargs(call), return_tensors=return_tensors)
            if any(isinstance(v, np.ndarray) and v.dtype == object for v in encoded.values()):
                # transformers returns ragged object arrays here, which no model can take.
                raise ValueError("the texts tokenise to different lengths (some are longer than max_length "
                                 "and truncation is off): pass truncation=True or padding='longest'")
            out.update(encoded)
        if images is not None:
            out["pixel_values"] = preprocess_images(images, self.image_config)
        return out


class AlignProcessor(_DualEncoderProcessor):
    """ALIGN: BERT WordPiece tokenizer + EfficientNet preprocessing.

    Texts are padded to 64 tokens by default (transformers' AlignProcessor) and not truncated
    unless ``truncation=True``. A directory without a preprocessor config gets the align-base
    settings (:data:`ALIGN_BASE_IMAGE_CONFIG`), not the EfficientNet class defaults: align-base is
    the checkpoint ALIGN is used with, and its settings differ from the class defaults.
    """

    image_processor_type = "EfficientNetImageProcessor"
    default_image_config = ALIGN_BASE_IMAGE_CONFIG
    tokenizer_class = "BertTokenizer"
    text_defaults = {"padding": "max_length", "max_length": 64}


class AltCLIPProcessor(_DualEncoderProcessor):
    """AltCLIP: XLM-RoBERTa tokenizer + CLIP preprocessing. No text defaults (no padding unless asked)."""

    image_processor_type = "CLIPImageProcessor"
    default_image_config = {}
    tokenizer_class = "XLMRobertaTokenizer"
    text_defaults = {}


class CLIPProcessor(_DualEncoderProcessor):
    """CLIP: CLIP's BPE tokenizer + CLIP preprocessing. No text defaults (no padding unless asked).

    The tokenizer is the class a directory's ``tokenizer_config.json`` names (a CLIP trained by
    altjax may carry its own), else ``CLIPTokenizer``.
    """

    image_processor_type = "CLIPImageProcessor"
    default_image_config = {}
    tokenizer_class = "CLIPTokenizer"
    text_defaults = {}
