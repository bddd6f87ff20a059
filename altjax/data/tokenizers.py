"""Tokenizers built from the scenes captions' own words, for runs on the embedded dataset
(:mod:`altjax.data.scenes`): a few hundred tokens instead of a pretrained tokenizer's tens of
thousands, and nothing to download.

``scenes_word_tokenizer``  BERT WordPiece over the English words (ALIGN's text tower).
``scenes_clip_tokenizer``  word-level, laid out like CLIP's (the ``clip-tiny`` preset).
``scenes_xlmr_tokenizer``  an XLM-R Unigram tokenizer covering the English words and the Chinese characters.
"""
from __future__ import annotations

import os

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from altjax.data import scenes

# transformers is imported where a tokenizer is built, not here: importing it imports torch when
# that is installed, which a run that builds no tokenizer (or only reads one) never needs.


def scenes_word_tokenizer(directory: str, lang: str):
    """A BERT WordPiece tokenizer whose vocabulary is the scenes captions' words (and [PAD], [UNK],
    [CLS], [SEP], [MASK]), written to ``directory``: 60-odd tokens instead of BERT's 30,522."""
    import transformers

    if lang != "en":
        raise ValueError("the scenes word tokenizer is English; give a tokenizer directory for other languages")
    words = sorted({w.lower() for w in scenes.vocabulary(lang)})
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    return transformers.BertTokenizer(os.path.join(directory, "vocab.txt"), do_lower_case=True)


def scenes_clip_tokenizer(directory: str, *, vocab_size: int = 1024):
    """A word-level English tokenizer of the scenes captions laid out like CLIP's (the
    ``clip-tiny`` preset): words first, ``<|startoftext|>`` = ``vocab_size - 2``,
    ``<|endoftext|>`` = ``vocab_size - 1`` (which also pads), lower-cased, punctuation split off.
    Chinese characters get ids of their own after the words, one per character, as CLIP's
    byte-level BPE gives any text tokens: trained on English captions only, the teacher never
    learns them, so it reads Chinese at about chance (mapping them all to ``<unk>`` would instead
    make every Chinese caption the same text, and retrieval ties)."""
    import transformers

    words = sorted({w.lower() for w in scenes.vocabulary("en")})
    chars = sorted(set(scenes.vocabulary("zh")) - {" "})
    vocab = {w: i for i, w in enumerate(words + ["<unk>"] + chars)}
    bos, eos = vocab_size - 2, vocab_size - 1
    if len(vocab) > bos:
        raise ValueError(f"{len(vocab)} words do not fit a vocabulary of {vocab_size}")
    vocab.update({"<|startoftext|>": bos, "<|endoftext|>": eos})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True, handle_chinese_chars=True, strip_accents=False)
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>", unk_token="<unk>", model_input_names=["input_ids", "attention_mask"])
    tokenizer.save_pretrained(directory)
    return tokenizer


def scenes_xlmr_tokenizer(directory: str):
    """An XLM-R (sentencepiece Unigram) tokenizer whose pieces are the scenes captions' English
    words (``▁word``) and Chinese characters (alone and as ``▁char``), with XLM-R's special tokens
    ``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3: no caption of either language has an unknown piece."""
    import transformers

    words = sorted({w.lower() for w in scenes.vocabulary("en")})
    chars = sorted(set(scenes.vocabulary("zh")) - {" "})
    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("<mask>", 0.0), ("▁", -8.0)]
    # Sentencepiece does not lower-case: a capitalised piece per word for sentence starts.
    vocab += [("▁" + v, -2.0) for w in words if w.isalnum() for v in dict.fromkeys((w, w.capitalize()))]
    vocab += [(w, -3.0) for w in words if not w.isalnum()]
    vocab += [(c, -4.0) for c in chars] + [("▁" + c, -4.5) for c in chars]
    tokenizer = transformers.XLMRobertaTokenizer(vocab=vocab, model_max_length=512)
    tokenizer.save_pretrained(directory)
    return transformers.AutoTokenizer.from_pretrained(directory)
