"""Command-line programs beside ``main.py``, each run as ``python -m tools.<name> ...``: ``sweep`` (wandb
sweeps, offline expansion and local runs), ``reproduce`` (the report's tables), ``summarize`` (tables and plots
from run directories), ``proxy_study`` (the synthetic proxy study), ``synthetic_voc`` (generate VOC-layout
data), ``emergence`` (the attention-Jaccard evaluation of any backbone). They sit above everything else: no
module of the library imports them."""
