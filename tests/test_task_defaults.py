"""A task's own defaults (config.hparams.TASK_DEFAULTS): --task=dino alone gives DINO's official recipe,
and YAML files and flags still override it."""
from __future__ import annotations

import pytest

from config.hparams import TASK_DEFAULTS, Hparams
from config.loading import ConfigError, parse_config, task_defaults
from config.validation import validate_values

# main_dino.py's argument defaults, written out by hand (facebookresearch/dino).
OFFICIAL_DINO = {
    ("optim", "name"): "adamw", ("optim", "lr"): 0.0005, ("optim", "lr_scaling"): "linear",
    ("optim", "weight_decay"): 0.04, ("optim", "warmup_epochs"): 10.0, ("backbone", "drop_path_rate"): 0.1,
    ("aug", "crop_scale_min"): 0.4, ("aug", "crop_scale_max"): 1.0, ("trainer", "max_epochs"): 100,
    ("dino", "out_dim"): 65536, ("dino", "hidden_dim"): 2048, ("dino", "bottleneck_dim"): 256,
    ("dino", "momentum_teacher"): 0.996, ("dino", "student_temp"): 0.1, ("dino", "teacher_temp"): 0.04,
    ("dino", "center_momentum"): 0.9, ("dino", "weight_decay_end"): 0.4, ("dino", "clip_grad"): 3.0,
    ("dino", "freeze_last_layer_epochs"): 1, ("dino", "local_crops_number"): 8,
    ("dino", "local_crops_scale_min"): 0.05, ("dino", "local_crops_scale_max"): 0.4,
    ("aug", "blur_prob_1"): 1.0, ("aug", "blur_prob_2"): 0.1, ("aug", "solarize_prob_1"): 0.0,
    ("aug", "solarize_prob_2"): 0.2, ("dino", "local_blur_prob"): 0.5,
}


def test_task_flag_alone_gives_the_official_dino_recipe():
    cfg = parse_config(["--task=dino"])
    for (group, name), value in OFFICIAL_DINO.items():
        assert getattr(getattr(cfg, group), name) == value, f"{group}.{name}"
    # DINO's min_lr 1e-6 at its reference batch of 256 (lr 0.0005 × 256/256)
    assert cfg.optim.lr * cfg.optim.min_lr_ratio == pytest.approx(1e-6)


def test_other_tasks_keep_the_dataclass_defaults():
    assert parse_config([]) == Hparams()
    assert parse_config(["--task", "segmentation"]).optim == Hparams().optim


def test_yaml_and_flags_override_task_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("task: dino\noptim:\n  weight_decay: 0.1\n")
    from_yaml = parse_config(["--config", str(path)])
    assert from_yaml.task == "dino" and from_yaml.optim.weight_decay == 0.1
    assert from_yaml.backbone.drop_path_rate == 0.1  # the task chosen in the YAML file picks its defaults
    flagged = parse_config(["--config", str(path), "--optim.weight_decay=0.2", "--backbone.drop_path_rate=0"])
    assert flagged.optim.weight_decay == 0.2 and flagged.backbone.drop_path_rate == 0.0
    # a flag choosing another task drops the YAML's task defaults
    assert parse_config(["--config", str(path), "--task=barlow_twins"]).backbone.drop_path_rate == 0.0


@pytest.mark.parametrize("task", sorted(TASK_DEFAULTS))
def test_every_task_default_names_a_field(task):
    task_defaults(task)  # apply_mapping rejects unknown keys and wrong types


def test_help_shows_the_task_defaults(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--task=dino", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--optim.weight_decay float" in text
    after = text.split("--optim.weight_decay float", 1)[1]
    assert "(default: 0.04)" in after.split("--optim.", 1)[0]


@pytest.mark.parametrize("flag, message", [
    ("--dino.out_dim=0", "--dino.out_dim must be > 0, got 0"),
    ("--dino.momentum_teacher=1.5", "--dino.momentum_teacher must be in [0, 1], got 1.5"),
    ("--dino.teacher_temp=0", "--dino.teacher_temp must be > 0, got 0.0"),
    ("--dino.local_crops_number=-1", "--dino.local_crops_number must be >= 0, got -1"),
    ("--dino.clip_grad=-1", "--dino.clip_grad must be >= 0 (0 = off), got -1.0"),
    ("--dino.local_crops_scale_min=0.5", "--dino.local_crops_scale_min/max must satisfy 0 < min <= max <= 1, got 0.5 and 0.4"),
    ("--dino.local_blur_prob=2", "--dino.local_blur_prob must be a probability in [0, 1], got 2.0"),
])
def test_bad_dino_values_get_one_line(flag, message):
    with pytest.raises(ConfigError) as err:
        validate_values(parse_config(["--task=dino", flag]))
    assert str(err.value) == message
