"""Towers (efficientnet, bert, vit, xlm_roberta, clip_text) and dual encoders (align, altclip)."""
