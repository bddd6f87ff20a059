"""Demos that train and evaluate end to end on the embedded scenes dataset, in minutes on a CPU:

    python -m altjax.demos.align      # a tiny ALIGN from scratch, evaluated before and after
    python -m altjax.demos.altclip    # the miniature of AltCLIP's results table: CLIP, phase 1, phase 2
"""
