"""Probing what a model learned: CLS-attention recomputation and mass-threshold masks (``attention``),
effective receptive fields (``receptive_field``), the attention-vs-object Jaccard of emergence studies
(``emergence``). Used by the models (the attention-aware head), the callbacks and the tools, so it sits below
the models: it imports torch and the data layer's error type, never a model, a task or a callback (they hand it
the modules to probe)."""
