"""The training recipes, installed with altjax as the package ``altjax_configs``:
``altjax-train --config NAME`` runs ``configs/NAME.py``."""
