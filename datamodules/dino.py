"""DataModule for DINO pretraining: unlabelled VOC images → multi-crop views (datamodules/multicrop.py).

Everything but the transform is the Barlow Twins DataModule's: the same images, the same seeded sampling
(:class:`~datamodules.sampling.SeededSampler`: views depend only on (seed, epoch, position), not on workers
or global RNG state), exact mid-epoch resume, validation views fixed across epochs, and the accessors the
callbacks use (``val_set.image_paths``, ``root``, ``cfg.img_size``, :meth:`validation_views`).
"""
from __future__ import annotations

from typing import Optional, Union

from config.hparams import AugmentConfig, DataConfig, DinoConfig
from datamodules.barlow_twins import BarlowTwinsDataModule
from datamodules.device_decode import EncodedMultiCropTransform, augment_mode
from datamodules.multicrop import DeviceMultiCropTransform, MultiCropTransform, ViewSpec, resolve_local_size

MultiCropMode = Union[MultiCropTransform, DeviceMultiCropTransform, EncodedMultiCropTransform]
# aug.device: the workers finish the views (cpu), crop them (gpu_photometric) or only read the files (gpu_full).
MULTICROP_MODES = {"cpu": MultiCropTransform, "gpu_photometric": DeviceMultiCropTransform,
                   "gpu_full": EncodedMultiCropTransform}


class DinoDataModule(BarlowTwinsDataModule):
    """Batches are lists of 2 + dino.local_crops_number normalised float tensors: the global views
    (B, 3, img_size, img_size) first, then the local ones (B, 3, L, L), L = :attr:`local_size`.

    ``granularity``: the backbone's patch size (:func:`models.backbones.input_granularity`), needed when
    dino.local_crop_size is 0 (automatic: a multiple of it, see :func:`datamodules.multicrop.default_local_size`). ``aug.device`` (or ``aug.gpu``) as for Barlow Twins:
    ``gpu_photometric``, the workers crop (uint8) and draw the photometric parameters; ``gpu_full``, they only
    read the files and draw every parameter; :meth:`on_after_batch_transfer` finishes the views on the
    training device. Same seed, same crops and parameters in every mode.
    """

    def __init__(self, data: DataConfig, aug: AugmentConfig, dino: DinoConfig, seed: int = 0,
                 granularity: Optional[int] = None):
        # Read by make_transform(), which the base class's constructor calls.
        self.dino = dino
        self.local_size = resolve_local_size(data.img_size, dino, granularity)
        super().__init__(data, aug, seed)

    def make_transform(self) -> MultiCropMode:
        mode = MULTICROP_MODES[augment_mode(self.aug)]
        return mode(self.aug, self.cfg.img_size, self.dino, self.local_size)

    @property
    def views(self) -> list[ViewSpec]:
        """What each position of a batch holds (name, size, crop scale range, blur/solarise probability)."""
        return self.transform.views
