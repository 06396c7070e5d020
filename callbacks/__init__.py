"""Optional training behaviour, each in its own callback; :func:`visualisation_callbacks` builds the
pictures and the during-training measurements (emergence Jaccard, online probe) the config asks for."""
from __future__ import annotations

import pytorch_lightning as pl

from config.hparams import Hparams


def visualisation_callbacks(cfg: Hparams) -> list[pl.Callback]:
    from callbacks.visual import parse_indices

    c = cfg.callbacks
    common = {"every_n_epochs": c.every_n_epochs, "num_images": c.num_images}
    out: list[pl.Callback] = []
    if c.attention:
        from callbacks.attention_maps import AttentionMapCallback

        out.append(AttentionMapCallback(blocks=parse_indices(c.attention_blocks, "--callbacks.attention_blocks"),
                                        keep=c.attention_keep, **common))
    if c.erf:
        from callbacks.receptive_field import ReceptiveFieldCallback

        out.append(ReceptiveFieldCallback(layers=c.erf_layers, log_scale=c.erf_log_scale, every_n_epochs=c.every_n_epochs,
                                          num_images=c.erf_images))
    if cfg.task == "barlow_twins":
        if c.cross_correlation:
            from callbacks.cross_correlation import CrossCorrelationCallback

            out.append(CrossCorrelationCallback(block=c.cross_correlation_block, every_n_epochs=c.every_n_epochs))
        if c.views:
            from callbacks.views import ViewPairsCallback

            out.append(ViewPairsCallback(**common))
        if c.emergence:
            from callbacks.emergence import EmergenceCallback

            out.append(EmergenceCallback(num_images=c.emergence_images, every_n_epochs=c.emergence_every_n_epochs,
                                         keep=c.attention_keep))
        if c.online_probe:
            from callbacks.online_probe import OnlineProbeCallback

            out.append(OnlineProbeCallback.from_hparams(cfg))
    if cfg.task == "segmentation" and c.predictions:
        from callbacks.predictions import PredictionsCallback

        out.append(PredictionsCallback(**common))
    return out
