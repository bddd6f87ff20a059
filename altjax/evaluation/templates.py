"""Prompt templates for zero-shot classification, and reading custom template lists from files.

A template is a string with one ``{}`` where the class name goes ("a photo of a {}."). Built-in
sets are written in the same plain format that ``load_templates`` reads: one template per line,
blank lines and lines starting with ``#`` ignored.
"""
from __future__ import annotations

import json
import os
from typing import Sequence, Union

PLACEHOLDER = "{}"


def fill_template(template: str, classname: str) -> str:
    """The prompt for one class. ``str.replace`` rather than ``format`` so that other braces in a
    template are kept literally instead of raising."""
    return template.replace(PLACEHOLDER, classname)


def check_templates(templates: Sequence[str], source: str = "templates") -> tuple[str, ...]:
    """Returns the templates as a tuple; ValueError if empty or if one lacks the ``{}`` placeholder."""
    if isinstance(templates, str) or not all(isinstance(t, str) for t in templates):
        raise ValueError(f"{source}: expected a list of template strings, got {type(templates).__name__}")
    templates = tuple(templates)
    if not templates:
        raise ValueError(f"{source}: no templates")
    for i, template in enumerate(templates):
        if PLACEHOLDER not in template:
            raise ValueError(
                f"{source}: template {i} {template!r} has no '{{}}' placeholder for the class name"
            )
    return templates


def parse_templates(text: str, source: str = "<string>") -> tuple[str, ...]:
    """Templates from the line format: one per line, blank lines and ``#`` comment lines skipped."""
    templates, lines = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            templates.append(line)
            lines.append(number)
    if not templates:
        raise ValueError(f"{source}: no templates")
    for template, number in zip(templates, lines):
        if PLACEHOLDER not in template:
            raise ValueError(
                f"{source}, line {number}: template {template!r} has no '{{}}' placeholder for the class name"
            )
    return tuple(templates)


def load_templates(path: Union[str, os.PathLike]) -> tuple[str, ...]:
    """Reads a template list from a file (UTF-8).

    Two formats: a JSON list of strings (a ``.json`` file, or any file whose content starts with
    ``[``), or plain text with one template per line (blank lines and ``#`` lines skipped). Every
    template must contain ``{}``; a ValueError names the file and the offending line or entry.
    """
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json") or text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of template strings, got {type(data).__name__}")
        return check_templates(data, source=path)
    return parse_templates(text, source=path)


# The 80 ImageNet prompts of CLIP (Radford et al. 2021), in the order of OpenAI's
# "Prompt_Engineering_for_ImageNet" notebook (also open_clip's OPENAI_IMAGENET_TEMPLATES).
OPENAI_IMAGENET_TEMPLATES = parse_templates(
    """
    a bad photo of a {}.
    a photo of many {}.
    a sculpture of a {}.
    a photo of the hard to see {}.
    a low resolution photo of the {}.
    a rendering of a {}.
    graffiti of a {}.
    a bad photo of the {}.
    a cropped photo of the {}.
    a tattoo of a {}.
    the embroidered {}.
    a photo of a hard to see {}.
    a bright photo of a {}.
    a photo of a clean {}.
    a photo of a dirty {}.
    a dark photo of the {}.
    a drawing of a {}.
    a photo of my {}.
    the plastic {}.
    a photo of the cool {}.
    a close-up photo of a {}.
    a black and white photo of the {}.
    a painting of the {}.
    a painting of a {}.
    a pixelated photo of the {}.
    a sculpture of the {}.
    a bright photo of the {}.
    a cropped photo of a {}.
    a plastic {}.
    a photo of the dirty {}.
    a jpeg corrupted photo of a {}.
    a blurry photo of the {}.
    a photo of the {}.
    a good photo of the {}.
    a rendering of the {}.
    a {} in a video game.
    a photo of one {}.
    a doodle of a {}.
    a close-up photo of the {}.
    a photo of a {}.
    the origami {}.
    the {} in a video game.
    a sketch of a {}.
    a doodle of the {}.
    a origami {}.
    a low resolution photo of a {}.
    the toy {}.
    a rendition of the {}.
    a photo of the clean {}.
    a photo of a large {}.
    a rendition of a {}.
    a photo of a nice {}.
    a photo of a weird {}.
    a blurry photo of a {}.
    a cartoon {}.
    art of a {}.
    a sketch of the {}.
    a embroidered {}.
    a pixelated photo of a {}.
    itap of the {}.
    a jpeg corrupted photo of the {}.
    a good photo of a {}.
    a plushie {}.
    a photo of the nice {}.
    a photo of the small {}.
    a photo of the weird {}.
    the cartoon {}.
    art of the {}.
    a drawing of the {}.
    a photo of the large {}.
    a black and white photo of a {}.
    the plushie {}.
    a dark photo of a {}.
    itap of a {}.
    graffiti of the {}.
    a toy {}.
    itap of my {}.
    a photo of a cool {}.
    a photo of a small {}.
    a tattoo of the {}.
    """,
    source="OPENAI_IMAGENET_TEMPLATES",
)

# The 7-prompt subset the same notebook selected as nearly as good as all 80 on ImageNet.
OPENAI_IMAGENET_SELECTED_TEMPLATES = parse_templates(
    """
    itap of a {}.
    a bad photo of the {}.
    a origami {}.
    a photo of the large {}.
    a {} in a video game.
    art of the {}.
    a photo of the small {}.
    """,
    source="OPENAI_IMAGENET_SELECTED_TEMPLATES",
)

# Our own short generic English list for small datasets (CIFAR-like, the synthetic demo set),
# where the ImageNet-specific styles (origami, plushie, video game) only add noise.
ENGLISH_TEMPLATES = parse_templates(
    """
    a photo of a {}.
    a photo of the {}.
    a blurry photo of a {}.
    a close-up photo of a {}.
    a bright photo of a {}.
    a dark photo of a {}.
    a photo of a small {}.
    a photo of a large {}.
    """,
    source="ENGLISH_TEMPLATES",
)

# Our own Chinese prompts (not a translation of a published list): "a photo of {}", "a blurry photo
# of {}", "a close-up photo of {}", "a bright photo of {}", "a dark photo of {}", "a photo of a
# small {}", "a photo of a large {}", "a picture of {}", "this is a photo of {}".
CHINESE_TEMPLATES = parse_templates(
    """
    一张{}的照片。
    一张模糊的{}的照片。
    一张{}的特写照片。
    一张明亮的{}的照片。
    一张昏暗的{}的照片。
    一张小{}的照片。
    一张大{}的照片。
    {}的图片。
    这是一张{}的照片。
    """,
    source="CHINESE_TEMPLATES",
)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "openai_imagenet": OPENAI_IMAGENET_TEMPLATES,
    "openai_imagenet_selected": OPENAI_IMAGENET_SELECTED_TEMPLATES,
    "en": ENGLISH_TEMPLATES,
    "zh": CHINESE_TEMPLATES,
}


def get_templates(name_or_path: str) -> tuple[str, ...]:
    """A built-in set by name (``TEMPLATE_SETS``), otherwise a template file (``load_templates``)."""
    if name_or_path in TEMPLATE_SETS:
        return TEMPLATE_SETS[name_or_path]
    if not os.path.exists(name_or_path):
        raise ValueError(
            f"{name_or_path!r} is neither a built-in template set {sorted(TEMPLATE_SETS)} nor an existing file"
        )
    return load_templates(name_or_path)
