"""Every hyperparameter of a run, one dataclass per group.

Each field can be set three ways, later ones winning: the defaults below, a YAML file given with
``--config FILE.yaml`` (nested like these dataclasses), and command-line flags ``--group.field=VALUE``
(the form wandb sweeps pass). Field docstrings are the ``python main.py --help`` text.

Values a sweep may vary are scalars on purpose: wandb passes ``--name=value`` and cannot express lists.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class DataConfig:
    """Dataset, loading and input size."""

    dataset: str = "voc"
    """Dataset: 'voc' (Pascal VOC 2012 under data.root), 'synthetic' (generated VOC-layout data, cached
    under data.root; works offline), or for pretraining only 'folder' (every JPEG/PNG/WebP under data.root,
    recursively) and 'imagenet' (data.root/train/<class>/<image>, class ids kept)."""

    root: str = "data"
    """voc: folder holding VOCdevkit/VOC2012. synthetic: folder where the generated set is cached. folder:
    the folder of images. imagenet: the folder holding train/."""

    download: bool = False
    """voc only: download and extract VOC 2012 with torchvision when it is missing under data.root (online)."""

    batch_size: int = 64
    """Images per optimisation step (for Barlow Twins: the batch over which the cross-correlation is
    computed; below 64 it tends to explode)."""

    img_size: int = 224
    """Side of the square network input in pixels; must be a multiple of the ViT patch size."""

    pretrain_images: Literal["train", "train+val", "all"] = "train"
    """Barlow Twins: which images to pretrain on: VOC 'train' segmentation split, 'train+val', or 'all'
    images in JPEGImages (17k for VOC 2012)."""

    val_max_images: int = 0
    """Use at most this many validation images (0 = the whole val split)."""

    num_workers: int = -1
    """DataLoader worker processes (-1 = min(8, CPU count); 0 = load in the training process)."""

    worker_timeout: float = 600.0
    """Seconds the run waits for one batch from the DataLoader worker processes before it stops with an error
    (a worker stuck on a hung file system or a deadlock ends the run instead of hanging it; 0 = wait forever).
    Only used with data.num_workers other than 0."""

    pin_memory: bool = True
    """Pin host memory for faster transfers to the GPU (ignored on CPU)."""

    synthetic_train: int = 1000
    """synthetic only: number of generated training images."""

    synthetic_val: int = 200
    """synthetic only: number of generated validation images."""

    synthetic_size: int = 128
    """synthetic only: side of the generated images in pixels."""

    synthetic_seed: int = 0
    """synthetic only: seed of the generator (the same seed gives byte-identical data)."""

    eval_root: str = ""
    """folder/imagenet: a VOC-layout labelled set (a folder holding VOCdevkit/VOC2012) for the callbacks that
    need masks (emergence Jaccard, online probe) and for the validation views (its val split). Empty: those
    callbacks must be off, and validation uses data.val_max_images (0 = 256) training images."""

    file_list: str = ""
    """folder: a text file naming the images, one path per line (relative to data.root, or absolute; '#'
    comments), read instead of walking data.root."""

    subfolders: str = ""
    """folder: comma-separated subfolders of data.root to walk (e.g. train2017,unlabeled2017 for COCO);
    empty = all of data.root."""

    index_dir: str = ""
    """folder/imagenet: where the cached list of image files goes (empty = a hidden .vitssl_index folder in
    data.root when writable, else ~/.cache/vitssl/index). It is rebuilt when the tree's folders change."""

    skip_bad_images: bool = False
    """folder/imagenet: replace an undecodable image by the next decodable one of the list (same epoch
    length and batches; a count per epoch is logged) instead of stopping with an error naming the file."""


@dataclass
class AugmentConfig:
    """The two-view Barlow Twins augmentation (defaults: the official asymmetric recipe)."""

    crop_scale_min: float = 0.08
    """RandomResizedCrop: smallest crop area as a fraction of the image."""

    crop_scale_max: float = 1.0
    """RandomResizedCrop: largest crop area as a fraction of the image."""

    crop_interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    """RandomResizedCrop resampling."""

    hflip_prob: float = 0.5
    """Probability of a horizontal flip."""

    jitter_prob: float = 0.8
    """Probability of applying colour jitter."""

    brightness: float = 0.4
    """ColorJitter brightness strength."""

    contrast: float = 0.4
    """ColorJitter contrast strength."""

    saturation: float = 0.2
    """ColorJitter saturation strength."""

    hue: float = 0.1
    """ColorJitter hue strength (at most 0.5)."""

    grayscale_prob: float = 0.2
    """Probability of converting to grayscale."""

    blur_sigma_min: float = 0.1
    """Gaussian blur: smallest sigma in pixels."""

    blur_sigma_max: float = 2.0
    """Gaussian blur: largest sigma in pixels."""

    blur_kernel_size: int = 0
    """Gaussian blur kernel size, odd (0 = smallest odd size covering ±3 sigma_max)."""

    blur_prob_1: float = 1.0
    """Probability of blurring the first view."""

    blur_prob_2: float = 0.1
    """Probability of blurring the second view."""

    solarize_prob_1: float = 0.0
    """Probability of solarising the first view."""

    solarize_prob_2: float = 0.2
    """Probability of solarising the second view."""

    gpu: bool = False
    """Same as --aug.device gpu_photometric (kept for existing configs)."""

    device: Literal["cpu", "gpu_photometric", "gpu_full"] = "cpu"
    """Where the augmentation runs. cpu: DataLoader workers decode and augment. gpu_photometric: workers
    decode, crop and flip (uint8); colour jitter, grayscale, blur and solarisation run batched on the
    training device. gpu_full: workers only read the file bytes and image sizes; JPEG decoding
    (torchvision.io.decode_jpeg), crops, resizes, flips and the photometric operations run batched on the
    training device (for segmentation training too; masks are decoded by the workers). Same seed, same
    crops and parameters in every mode; use a gpu_ mode when the CPU workers limit the training speed
    (benchmarks/bench_data.py)."""


@dataclass
class BackboneConfig:
    """The feature extractor."""

    name: str = "vit_small_patch16_224"
    """'vit' (a ViT built from depth/embed_dim/num_heads/patch_size, ViT-S/16 where 0), any timm ViT
    name (e.g. vit_small_patch16_224, vit_small_patch8_224, vit_small_patch16_224.dino), 'resnet50', or
    'pixels' (raw pixel patches of backbone.patch_size, default 8: a floor for segmentation probes)."""

    depth: int = 0
    """ViT: number of transformer blocks (0 = the named model's)."""

    embed_dim: int = 0
    """ViT: token width; must be divisible by num_heads (0 = the named model's)."""

    num_heads: int = 0
    """ViT: attention heads per block (0 = the named model's)."""

    patch_size: int = 0
    """ViT: patch side in pixels; data.img_size must be a multiple of it (0 = the named model's)."""

    weights: str = ""
    """Local weight file to initialise from: a timm/torchvision state dict (.pth/.pt/.safetensors), the
    official Barlow Twins ResNet-50 file, or one of our checkpoints (runs/<run>/checkpoints/last.ckpt; of a
    DINO run, its teacher backbone, as DINO evaluates)."""

    pretrained: bool = False
    """Download the named model's published weights (timm hub / torchvision; needs internet), e.g.
    DINO with name=vit_small_patch16_224.dino."""

    strict_weights: bool = False
    """Fail (instead of warning) when backbone.weights has missing or unexpected keys."""

    global_pool: Literal["token", "avg"] = "token"
    """ViT image embedding for Barlow Twins: the CLS 'token' or the 'avg' of the patch tokens."""

    drop_path_rate: float = 0.0
    """ViT stochastic depth rate."""

    resnet_norm: Literal["batch", "frozen", "group"] = "batch"
    """ResNet-50 normalisation: 'batch' (BatchNorm, torchvision's), 'frozen' (BatchNorm with fixed
    statistics and affine parameters still trained, as detection backbones do; batch-independent), or
    'group' (GroupNorm with 32 groups; batch-independent, not compatible with BatchNorm weights)."""


@dataclass
class BarlowConfig:
    """Barlow Twins projector and loss."""

    proj_dim: int = 512
    """Width of every projector layer (512 worked best for ViTs in the report; 8192 is the official)."""

    proj_layers: int = 3
    """Number of Linear layers in the projector (BatchNorm + ReLU between them)."""

    lambd: float = 0.0051
    """Weight of the off-diagonal (redundancy reduction) term."""

    micro_batch_size: int = 0
    """Process each batch in chunks of this many images (0 = off): loss and gradients stay those of the
    whole data.batch_size (the projector and the loss see the whole batch), while backbone activation
    memory is that of one chunk (gradient caching: backbone activations are recomputed chunk by chunk
    in the backward pass). Exact for ViTs; a ResNet with BatchNorm normalises each chunk by its own
    statistics (see backbone.resnet_norm)."""

    dense_weight: float = 0.0
    """Weight of the dense Barlow Twins term between patch tokens of the two views that see the same
    image region (0 = off; ViT backbones only)."""

    dense_proj_dim: int = 512
    """Width of the dense term's own projector layers."""

    dense_points: int = 16
    """Dense term: matching points sampled per image in the region both views see; both views' patch-token
    grids are read there bilinearly."""

    shared_crop: bool = False
    """Both views use one random crop (and flip) of the image; only the photometric augmentations differ."""


@dataclass
class DinoConfig:
    """DINO self-distillation (Caron et al., 2021; task=dino). Every default is the official code's
    (facebookresearch/dino, main_dino.py). The global crops use the aug.* recipe (their scale range
    aug.crop_scale_min/max; --task=dino sets DINO's 0.4-1 and the other official values of shared
    fields, see TASK_DEFAULTS below); the local crops are set here."""

    out_dim: int = 65536
    """Width K of the projection head's last layer (the number of prototypes the softmax is over;
    official: 65536)."""

    hidden_dim: int = 2048
    """Hidden width of the projection head's MLP (official: 2048)."""

    bottleneck_dim: int = 256
    """Width of the head's bottleneck, the L2-normalised features before its last layer (official: 256)."""

    head_layers: int = 3
    """Linear layers of the head's MLP before the bottleneck output, GELU between them (official: 3)."""

    norm_last_layer: bool = True
    """Weight-normalise the head's last layer with its norm fixed at 1 (official: true; false trains the
    norm, which the official code suggests for ViT-S only as an unstable but better option)."""

    use_bn_in_head: bool = False
    """BatchNorm in the head's MLP (official: false for ViTs)."""

    momentum_teacher: float = 0.996
    """Base EMA momentum of the teacher; it rises to 1 on a cosine schedule over training, stepped every
    iteration (official: 0.996)."""

    student_temp: float = 0.1
    """Softmax temperature of the student's outputs (official: 0.1)."""

    teacher_temp: float = 0.04
    """Softmax temperature of the teacher's outputs after warmup_teacher_temp_epochs (official: 0.04;
    the official code suggests up to 0.07, with a warmup from 0.04)."""

    warmup_teacher_temp: float = 0.04
    """Teacher temperature at the start; it rises linearly to teacher_temp over warmup_teacher_temp_epochs
    (official: 0.04)."""

    warmup_teacher_temp_epochs: int = 0
    """Epochs of the teacher-temperature warmup (official: 0; 30 with teacher_temp 0.07)."""

    center_momentum: float = 0.9
    """EMA momentum of the center subtracted from the teacher's outputs (official: 0.9)."""

    freeze_last_layer_epochs: int = 1
    """Epochs during which the head's last layer gets no update (official: 1)."""

    weight_decay_end: float = 0.4
    """Final weight decay; it rises from optim.weight_decay on a cosine schedule, stepped every iteration
    (official: 0.04 to 0.4)."""

    clip_grad: float = 3.0
    """Clip each parameter's gradient norm to this value separately, as the official clip_gradients does
    (0 = off; official: 3.0). Independent of trainer.gradient_clip_val (a global norm)."""

    local_crops_number: int = 8
    """Number of small local crops per image besides the 2 global ones (0 = none; official: 8)."""

    local_crops_scale_min: float = 0.05
    """Local crops' RandomResizedCrop: smallest area as a fraction of the image (official: 0.05)."""

    local_crops_scale_max: float = 0.4
    """Local crops' RandomResizedCrop: largest area as a fraction of the image (official: 0.4)."""

    local_crop_size: int = 0
    """Side of the local crops in pixels (0 = data.img_size × 96/224 rounded to a multiple of the patch size:
    the official 96 px at 224 px inputs)."""

    local_blur_prob: float = 0.5
    """Probability of blurring a local crop (official: 0.5; the global crops use aug.blur_prob_1/2 = 1.0/0.1
    and aug.solarize_prob_1/2 = 0/0.2, DINO's values)."""

    micro_batch_size: int = 0
    """Run the student backbone in chunks of this many images (0 = off; not in the official code): loss and
    gradients stay those of the whole batch (the head, the loss and the center see all of it), while the
    backbone's activation memory is that of one chunk (gradient caching: its activations are recomputed
    chunk by chunk in the backward pass). Exact for ViTs; a ResNet with BatchNorm normalises each chunk by
    its own statistics."""


@dataclass
class VICRegConfig:
    """VICReg (Bardes et al., 2022; facebookresearch/vicreg ``main_vicreg.py``): expander and loss (task=vicreg)."""

    expander: str = "8192-8192-8192"
    """Widths of the expander's Linear layers after the backbone, dash-separated (official: 8192-8192-8192;
    BatchNorm + ReLU after each but the last, which has no bias). The loss is computed on the last width."""

    sim_coeff: float = 25.0
    """Weight of the invariance term, the mean squared distance of the two views' embeddings (official: 25)."""

    std_coeff: float = 25.0
    """Weight of the variance term, mean over dimensions of relu(1 − sqrt(var + 1e-4)) (official: 25)."""

    cov_coeff: float = 1.0
    """Weight of the covariance term, sum of squared off-diagonal covariances / dimension (official: 1)."""

    micro_batch_size: int = 0
    """Run the backbone in chunks of this many images (0 = off; not in the official code), gradient-cached as
    barlow.micro_batch_size: loss and gradients stay the whole batch's, activation memory is one chunk's."""


TASK_DEFAULTS: dict[str, dict[str, object]] = {
    "vicreg": {
        # The official VICReg recipe where it differs from this file's defaults (main_vicreg.py's arguments).
        "optim.name": "lars",  # official: LARS, biases and norms excluded from decay and adaptation
        "optim.lr": 0.2,  # official --base-lr 0.2, × batch / 256
        "optim.lr_scaling": "linear",
        "optim.weight_decay": 1e-6,  # official --wd 1e-6
        "optim.warmup_epochs": 10.0,  # official: 10 warmup epochs, then cosine to 0.001 × the peak
        "optim.min_lr_ratio": 0.001,
        "optim.bias_lr_scale": 1.0,  # official: one rate for every parameter
        "trainer.max_epochs": 100,  # official --epochs 100
    },
    "dino": {
        # The official DINO recipe where it differs from this file's defaults (main_dino.py's arguments).
        "optim.name": "adamw",
        "optim.lr": 0.0005,
        "optim.lr_scaling": "linear",  # lr × global batch / 256
        "optim.weight_decay": 0.04,  # the start of the cosine schedule to dino.weight_decay_end
        "optim.warmup_epochs": 10.0,
        "optim.min_lr_ratio": 0.002,  # official min_lr 1e-6 = 0.002 × 0.0005 (exact at global batch 256)
        "backbone.drop_path_rate": 0.1,
        "aug.crop_scale_min": 0.4,  # global crops 0.4-1
        "trainer.max_epochs": 100,
    },
}
"""Default values a task replaces (before YAML files and flags, which still win): ``--task=dino`` alone
gives the official DINO recipe; ``python main.py --task=dino --help`` shows them as the defaults."""


@dataclass
class SegmentationConfig:
    """Semantic segmentation on VOC 2012 (task=segmentation): frozen backbone + a light head."""

    head: str = "setr_naive"
    """ViT heads on the patch tokens: 'linear', SETR's 'setr_naive', 'setr_pup', 'setr_mla', the report's
    setr-pytorch variants 'setr_pytorch_naive' (hidden width = embed_dim) and 'setr_pytorch_pup' (a linear
    stack of 1x1 convs), 'attn_fusion' (patch tokens fused with maps derived from the last block's
    attention); ResNet-50: 'deeplabv3'. Architectures and parameter counts: docs/heads.md."""

    num_classes: int = 21
    """Output classes (VOC: background + 20); label 255 is ignored."""

    freeze_backbone: bool = True
    """Frozen backbone: no gradients and eval mode (dropout off, BatchNorm statistics fixed)."""

    backbone_lr: float = 1e-5
    """Learning rate of the backbone when it is fine-tuned (freeze_backbone=false); the head uses optim.lr."""

    hidden_dim: int = 256
    """Channels of the SETR heads' hidden layers (setr_mla: its MLA channels, half of it in its per-level
    heads; the setr_pytorch_* heads fix their own widths)."""

    mla_blocks: str = ""
    """setr_mla: comma-separated ViT block indices to aggregate, 0-based (empty = 4 evenly spaced blocks
    ending with the last, e.g. 2,5,8,11 for depth 12)."""

    head_weights: str = ""
    """Local file with trained head weights (e.g. a segmentation run's checkpoints/best-*.ckpt); with
    deeplabv3, a torchvision DeepLabV3 state dict (its classifier is the head)."""

    pretrained_head: bool = False
    """deeplabv3: start from torchvision's COCO-trained DeepLabV3-ResNet-50 (head and backbone; needs
    internet); backbone.weights / backbone.pretrained then replace the backbone part."""

    aux_loss: bool = False
    """Auxiliary heads and their losses (weight aux_weight each): deeplabv3's FCN head on layer3; setr_pup's
    SETR auxiliary heads (on aux_blocks and the last block); setr_mla's (one per MLA level)."""

    aux_weight: float = 0.4
    """Weight of each auxiliary loss (SETR and torchvision: 0.4)."""

    aux_blocks: str = ""
    """setr_pup with aux_loss: comma-separated 0-based ViT blocks carrying an auxiliary head, besides the last
    block (empty = SETR's ViT-L blocks 10, 15, 20 of 24 scaled to the depth, e.g. 4,6,9 for depth 12)."""

    classifier_dropout: float = 0.0
    """setr_pup, setr_mla: Dropout2d probability before the classifier (mmseg's decode-head default 0.1;
    SETR's own heads and mmseg's current SETR configs use 0)."""

    loss: Literal["ce", "dice", "focal"] = "ce"
    """Training loss; label 255 is ignored by all three."""

    focal_gamma: float = 2.0
    """Focal loss focusing parameter."""

    class_weighting: Literal["none", "median_frequency"] = "none"
    """Cross-entropy/focal class weights: 'none' (the report's protocol) or 'median_frequency' (median class
    pixel frequency / class frequency over the train masks; keeps weak features from collapsing to
    all-background)."""

    train_split: Literal["train", "trainaug"] = "train"
    """Training split: VOC 2012's 'train' (1,464 images, SegmentationClass masks; the report's protocol) or
    'trainaug' (10,582 images: train extended with the SBD annotations, masks in SegmentationClassAug; the
    training set of DeepLabV3, SETR and most frozen-probe papers; where to get it: docs/emergence.md). The
    synthetic source generates both."""

    crop_scale_min: float = 0.5
    """Training RandomResizedCrop: smallest crop area as a fraction of the image."""

    hflip_prob: float = 0.5
    """Training horizontal flip probability."""

    eval_mode: Literal["resize", "full"] = "resize"
    """'resize': image and mask at data.img_size (the report's protocol); 'full': logits resized back to
    each image's original resolution, mask untouched (what papers report)."""

    log_per_class_every_n_epochs: int = 1
    """Write the per-class IoU table (run directory + wandb) every this many validation epochs."""

    baselines: str = ""
    """Comma-separated references trained in the same run, on the same batches, with the same head, loss,
    optimiser, schedule and seed, for a ViT backbone: 'random_init' (the same backbone randomly initialised,
    frozen; logged as val/mIoU_random_init) and 'pixels' (raw pixel patches, val/mIoU_pixels). The final line
    prints them beside the run's best val/mIoU. Each costs about one more head training per step (random_init
    also one more backbone forward): with both, the quick start's follow-up used about twice the CPU time.
    Empty: none."""


@dataclass
class CallbacksConfig:
    """Visualisation callbacks: pictures under <run>/media/ and in wandb, on a small fixed set of
    validation images, every few epochs (never inside the training step)."""

    every_n_epochs: int = 5
    """Draw the pictures every this many epochs (and after the last one)."""

    num_images: int = 4
    """Fixed validation images shown by the image-based callbacks (the same ones every time)."""

    attention: bool = True
    """ViT: CLS-token attention maps per head, their mean, and DINO's mass-threshold masks."""

    attention_blocks: str = ""
    """Extra ViT blocks to show besides the last, comma-separated 0-based indices (e.g. 0,5)."""

    attention_keep: float = 0.6
    """Attention mass the threshold masks keep (DINO: 0.6)."""

    erf: bool = False
    """Effective receptive fields (Luo et al., 2017) of chosen layers (a separate forward/backward pass)."""

    erf_layers: str = ""
    """Layers for the receptive fields, comma-separated: ViT block indices (e.g. 0,3,11) or ResNet stage
    names (layer1..layer4); empty = a spread of 4 over the network."""

    erf_log_scale: bool = False
    """Receptive fields per pixel on a log colour scale, each panel divided by its peak (three decades).
    Default (false): linear, each panel on its own scale; a ViT's as the mean per patch divided by the
    largest one outside the patch under the centre token (that patch, which the residual path makes hold
    ~90 percent of the gradient, saturates and is outlined; its share is in the title), a ResNet's per
    pixel divided by its peak."""

    erf_images: int = 64
    """Validation images the receptive fields are averaged over (the first ones, the same every time). Fewer
    give noise: per patch, one map's noise is 28-38 percent of its level with 4 images, 7-9 percent with 64
    (quickstart model; it falls as 1/sqrt(images))."""

    cross_correlation: bool = True
    """Barlow Twins: heatmaps of the train (latest) and val (epoch-averaged) cross-correlation matrices,
    also once before training; scalars (mean diagonal, mean |off-diagonal|, diagonal > 0.9) every log step."""

    cross_correlation_block: int = 64
    """Also draw the top-left k×k block of the matrix at full resolution when proj_dim is larger (0 = off)."""

    teacher_entropy: bool = True
    """DINO: the collapse monitor that replaces the cross-correlation picture: the teacher's entropy and the
    entropy of its batch-mean output over training steps, with 0 (one dimension) and log(dino.out_dim)
    (uniform) marked: both curves near either line is collapse (DINO paper, sec. 5.3)."""

    views: bool = False
    """Barlow Twins: a grid of augmented view pairs (what the network is asked to match); DINO: every crop."""

    predictions: bool = True
    """Segmentation: image | ground truth | prediction grids with the VOC palette (and wandb masks)."""

    emergence: bool = True
    """Barlow Twins or DINO (the teacher) with a ViT: every emergence_every_n_epochs, the Jaccard similarity between the last
    block's CLS attention masks (callbacks.attention_keep of the mass, best head per object) and the
    ground truth of a fixed validation subset (callbacks.jaccard_protocol), logged as val/attn_jaccard.
    The whole split: python -m tools.emergence."""

    jaccard_protocol: Literal["dino", "strict"] = "dino"
    """Emergence Jaccard protocol. 'dino': the public code later work compares with DINO's 45.9/27.3/22.0
    (Naseer et al.: SegmentationClass classes, image and mask resized to emergence_img_size, void pixels
    counted in the union). 'strict': SegmentationObject instances at the mask's own resolution, void
    pixels excluded (lower numbers; not comparable with DINO's)."""

    emergence_img_size: int = 512
    """Side the images (and, for the dino protocol, the masks) are resized to for the emergence Jaccard
    (512 in the reference code); a multiple of the patch size. Smaller is much cheaper on a CPU."""

    emergence_images: int = 64
    """Validation images (with masks) the emergence Jaccard is computed on (a fixed, evenly spaced subset)."""

    emergence_every_n_epochs: int = 1
    """Compute the emergence Jaccard every this many epochs (and before training)."""

    emergence_corloc: bool = False
    """With the emergence Jaccard, also unsupervised object discovery: CorLoc of LOST and TokenCut from the last
    block's keys (val/corloc_lost, val/corloc_tokencut) on emergence_images images of the VOC 2012 detection
    val split (Annotations/, ImageSets/Main/val.txt; generated sets have them), at their own size. The whole
    split: python -m tools.emergence --metrics corloc."""

    online_probe: bool = False
    """Barlow Twins or DINO (on the teacher): train a linear segmentation head on detached patch tokens alongside pretraining
    (labelled train split, its own optimiser; the backbone gets no gradient from it) and log its val
    mIoU every online_probe_every_n_epochs."""

    online_probe_every_n_epochs: int = 5
    """Evaluate the online probe every this many epochs (and after the last one)."""

    online_probe_lr: float = 1e-3
    """Online probe learning rate (AdamW)."""

    online_probe_batch_size: int = 16
    """Labelled images per online probe step (one step per training step)."""


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule (linear warmup, then cosine decay), stepped every batch."""

    name: Literal["adamw", "lars"] = "adamw"
    """'adamw' (as in the report) or 'lars' (the official Barlow Twins recipe)."""

    lr: float = 5e-4
    """Peak learning rate, reached at the end of the warmup (times global batch / 256 with lr_scaling=linear);
    the peak may be at most 1000 (an AdamW step moves each weight by about the rate)."""

    lr_scaling: Literal["none", "linear"] = "none"
    """'none': optim.lr is the peak rate. 'linear': the peak rate is optim.lr × global batch / 256 (global
    batch = data.batch_size × devices × nodes), as the official Barlow Twins code scales its base rates
    (LARS: --optim.lr 0.2 gives 0.05 at batch 64). The rate used is logged as optim/effective_lr."""

    weight_decay: float = 0.05
    """Weight decay (the official LARS recipe uses 1.5e-6); times the peak learning rate at most 1."""

    exclude_1d_from_decay: bool = True
    """Exclude biases and normalisation parameters (1-D tensors) from weight decay and LARS adaptation."""

    bias_lr_scale: float = 1.0
    """Learning-rate multiplier of 1-D parameters (the official LARS recipe: 0.0048/0.2 = 0.024)."""

    warmup_epochs: float = 10.0
    """Linear warmup length in epochs (fractions allowed), from 0 as the official Barlow Twins schedule: step
    s of the W warmup steps runs at s / W of the peak rate."""

    min_lr_ratio: float = 0.001
    """Final learning rate of the cosine decay as a fraction of optim.lr."""

    momentum: float = 0.9
    """LARS momentum, in [0, 1)."""

    lars_eta: float = 0.001
    """LARS trust coefficient (> 0)."""

    beta1: float = 0.9
    """AdamW beta1, in [0, 1)."""

    beta2: float = 0.999
    """AdamW beta2, in [0, 1)."""


@dataclass
class TrainerConfig:
    """Lightning Trainer settings, checkpointing and resuming."""

    max_epochs: int = 400
    """Training epochs (400 in the report)."""

    max_steps: int = -1
    """Stop after this many optimiser steps (-1 = no limit; the schedule then follows max_epochs)."""

    accelerator: str = "auto"
    """'auto' (one CUDA GPU when present, else CPU), 'cpu' or 'gpu'."""

    devices: int = 1
    """Number of devices."""

    num_nodes: int = 1
    """Number of machines (multi-node DDP; launch with torchrun or SLURM, see docs/distributed.md)."""

    strategy: str = "auto"
    """Lightning strategy: 'auto' (one device, or DDP when devices > 1), 'ddp', 'ddp_spawn', 'ddp_find_unused_parameters_true'.
    Barlow Twins computes its cross-correlation over the global batch (all devices) with gradients."""

    sync_batchnorm: bool = False
    """Multi-GPU: synchronise the backbone's BatchNorm statistics across devices (ResNet-50; CUDA only).
    The projector always normalises over the global batch."""

    compile: bool = False
    """Compile the backbone with torch.compile (first steps are slower while it compiles)."""

    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    """torch.compile mode."""

    precision: str = "auto"
    """'auto' (bf16-mixed on a GPU that supports it, else 32-true), or any Lightning precision string."""

    gradient_clip_val: float = 0.0
    """Clip the gradient norm to this value (0 = off)."""

    check_val_every_n_epoch: int = 1
    """Run validation every this many epochs."""

    limit_train_batches: float = 1.0
    """Fraction of training batches per epoch (≤ 1.0), or a number of batches (> 1)."""

    limit_val_batches: float = 1.0
    """Fraction of validation batches (≤ 1.0), or a number of batches (> 1); 0 disables validation."""

    log_every_n_steps: int = 50
    """Write training metrics every this many steps."""

    checkpoint_every_n_steps: int = 0
    """Also save checkpoints/last.ckpt every this many optimizer steps (0 = at every epoch end only; it is
    always written at every epoch end, and when SIGTERM/SIGINT stops the run). A kill loses at most the
    steps since the last one; resuming continues mid-epoch with the same batches as never stopping."""

    finite_check_every_n_steps: int = 20
    """Check that the loss stayed finite every this many steps (and at each epoch end) — a host sync,
    so not every step; a non-finite loss anywhere in between is still caught."""

    tune_batch_size: bool = False
    """Before training, find the largest batch that fits (Lightning's Tuner) and train with it; the value
    found replaces data.batch_size in config.yaml and the wandb config."""

    tune_batch_size_mode: Literal["power", "binsearch"] = "power"
    """Batch-size search: 'power' (double until out of memory) or 'binsearch' (then bisect; keeps a 5 percent margin)."""

    tune_batch_size_max: int = 4096
    """Upper bound of the batch-size search (on CPU nothing runs out of memory: this bound, the dataset size
    or tune_batch_size_trials ends the search)."""

    tune_batch_size_trials: int = 25
    """Maximum number of batch sizes tried."""

    tune_lr: bool = False
    """Before training (after tune_batch_size), run the LR range test and train with the suggested peak
    learning rate, if its curve supports it (utils/tuning.py: check_lr_curve): at least 20 steps, the
    loss falls meaningfully (5 percent and 4 noise standard errors), the suggestion is inside the curve
    on its falling part. Otherwise a warning, and optim.lr is kept. Plot: media/lr_finder.png and wandb."""

    tune_lr_min: float = 1e-6
    """LR range test: smallest learning rate tried."""

    tune_lr_max: float = 1.0
    """LR range test: largest learning rate tried."""

    tune_lr_steps: int = 30
    """LR range test: training steps (at data.batch_size; at least 20 finite losses for its suggestion to be
    used). Cost: as many training steps, no validation. Quickstart model on a 2-core CPU: 30 steps 18 s
    (3.4 of its 5.2 s epochs), 100 steps 57 s."""

    eval_only: bool = False
    """Evaluate on the validation split without training (segmentation: with --backbone.weights and
    --segmentation.head_weights), writing the metrics to the run directory."""

    resume: str = ""
    """Continue a run in its own directory: a run directory, a checkpoint in it, or 'auto' with
    --log.run_name (resume that run if it exists, else start it: the preemption/requeue form). The run's
    config.yaml is the base; flags given now override it (e.g. a larger max_epochs). Never stored in
    config.yaml."""

    allow_rewind: bool = False
    """Accept a resume that goes back or changes the epoch it stops in, refused otherwise: from a checkpoint
    older than the run's last.ckpt (e.g. a best-*.ckpt; the steps after it are discarded), or from a
    mid-epoch checkpoint with another --data.batch_size, --trainer.limit_train_batches or number of devices
    (the rest of that epoch is cut differently). Applies to this command only (never stored in config.yaml)."""

    deterministic: bool = False
    """Force deterministic algorithms (slower; some CUDA ops only warn)."""

    progress_bar: bool = True
    """Show a progress bar."""

    progress_refresh_rate: int = 10
    """Refresh the progress bar every this many steps (each refresh syncs with the device)."""


@dataclass
class LogConfig:
    """Run directory and Weights & Biases."""

    output_dir: str = "runs"
    """Parent folder of run directories (<output_dir>/<run_name>/)."""

    run_name: str = ""
    """Run directory and wandb run name: one folder name inside output_dir, no '/' (empty =
    <task>-<backbone>-<date>-<time>)."""

    wandb_mode: Literal["online", "offline", "disabled"] = "online"
    """wandb: 'online', 'offline' (files under the run directory, sync later), or 'disabled'. Online without
    credentials falls back to offline with a warning."""

    wandb_project: str = "vitssl"
    """wandb project."""

    wandb_entity: str = ""
    """wandb entity (user or team; empty = your default)."""

    wandb_tags: str = ""
    """Comma-separated wandb tags."""

    tensorboard: bool = False
    """Also log to TensorBoard: scalars and every picture of media/, event files under <run>/tensorboard/
    (view with `tensorboard --logdir runs`). Beside the CSV and wandb, not instead."""

    verbose: bool = False
    """Everything on the console even when it is not a terminal (a file, a pipe, a batch job's log): progress
    bars, the libraries' known harmless notices and wandb's own summary. By default such output gets the
    run's own lines and one short summary at the end; a terminal always gets everything."""


@dataclass
class Hparams:
    """vitssl: Barlow Twins and DINO pretraining of ViTs / ResNet-50 on Pascal VOC 2012, and segmentation."""

    task: str = "barlow_twins"
    """What to run: 'barlow_twins', 'dino' or 'vicreg' (self-supervised pretraining; dino and vicreg also replace
    some defaults by their official ones, see --task=dino --help) or 'segmentation' (VOC 2012 semantic segmentation
    with a frozen backbone and a light head)."""

    seed: int = 42
    """Global random seed, 0 to 2**32 - 1 (same seed + config + machine = same numbers)."""

    data: DataConfig = field(default_factory=DataConfig)
    aug: AugmentConfig = field(default_factory=AugmentConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    barlow: BarlowConfig = field(default_factory=BarlowConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    vicreg: VICRegConfig = field(default_factory=VICRegConfig)
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    log: LogConfig = field(default_factory=LogConfig)
