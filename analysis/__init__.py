"""Probing what a model learned: CLS-attention recomputation and mass-threshold masks (``attention``),
effective receptive fields (``receptive_field``), the attention-vs-object Jaccard of emergence studies
(``emergence``). Used by the callbacks, the attention-aware head and the tools; imports models and data,
never the training layers above them."""
