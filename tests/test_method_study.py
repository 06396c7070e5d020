"""The method study (tools/method_study.py) and its fixed-view probe (tools/feature_probe.py): the cached probe
against main.py's own run of the same config, the convergence rule, epoch doubling, the report."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

import main
from config.loading import ConfigError, parse_config
from config.validation import validate
from tools import feature_probe, method_study
from tools.sweep import in_repo_root

FIXED_VIEW = {"task": "segmentation", "segmentation__crop_scale_min": 1.0, "segmentation__hflip_prob": 0.0,
              "segmentation__hidden_dim": 16, "segmentation__class_weighting": "median_frequency",
              "data__batch_size": 4, "optim__lr": 0.01, "optim__warmup_epochs": 1, "trainer__max_epochs": 3,
              "callbacks__predictions": "false", "log__wandb_mode": "disabled"}


def main_py_curves(run_dir: Path) -> tuple[list[float], list[float]]:
    with (run_dir / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    return ([float(r["val/mIoU"]) for r in rows if r.get("val/mIoU")],
            [float(r["val/loss"]) for r in rows if r.get("val/loss")])


@pytest.mark.parametrize("head", ["linear", "setr_naive"])
def test_fixed_view_probe_gives_main_pys_numbers(tiny, tmp_path, head):
    """The cached probe is main.py's frozen probe: same head init, batches, loss, schedule and scores."""
    flags = tiny(f"seg-{head}", segmentation__head=head, **FIXED_VIEW)
    assert main.main(flags) == 0
    reference_miou, reference_loss = main_py_curves(tmp_path / "runs" / f"seg-{head}")
    cfg = validate(parse_config(flags))
    cache = feature_probe.compute_features(cfg)
    result = feature_probe.train_head(cfg, cache, tmp_path / "probe" / "metrics.csv")
    assert len(reference_miou) == 3 and len(result.curve) == 3
    assert result.curve == pytest.approx(reference_miou, abs=1e-4)
    assert len(set(round(v, 4) for v in reference_miou)) > 1  # the head does learn: the curve is not flat
    with (tmp_path / "probe" / "metrics.csv").open(newline="") as f:
        losses = [float(r["val/loss"]) for r in csv.DictReader(f)]
    assert losses == pytest.approx(reference_loss, rel=1e-4)


@pytest.mark.parametrize("overrides, message", [
    ({"segmentation__crop_scale_min": 0.5}, "--segmentation.crop_scale_min 1"),
    ({"segmentation__hflip_prob": 0.5}, "--segmentation.hflip_prob 0"),
    ({"segmentation__head": "attn_fusion"}, "attention"),
    ({"segmentation__freeze_backbone": "false"}, "--segmentation.freeze_backbone"),
    ({"segmentation__eval_mode": "full"}, "--segmentation.eval_mode"),
])
def test_configs_the_cached_probe_would_measure_differently_are_refused(tiny, overrides, message):
    cfg = parse_config(tiny("x", **{**FIXED_VIEW, **overrides}))
    assert message in feature_probe.protocol_problem(cfg)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        feature_probe.compute_features(cfg)


def test_fixed_view_overlay_makes_the_proxy_probe_cacheable():
    with in_repo_root():
        augmented = parse_config(["--config", method_study.PROBE])
        fixed = parse_config(["--config", method_study.PROBE, "--config", method_study.FIXED_VIEW])
    assert "crop_scale_min" in feature_probe.protocol_problem(augmented)
    assert feature_probe.protocol_problem(fixed) is None


def test_the_dino_proxy_config_trains_the_barlow_twins_runs_vit_on_their_data():
    with in_repo_root():
        bt = validate(parse_config(["--config", "config/proxy/pretrain.yaml"]))
        dino = validate(parse_config(["--config", "config/proxy/pretrain_dino.yaml"]))
    assert dino.task == "dino"
    assert dino.backbone == bt.backbone.__class__(**{**vars(bt.backbone), "drop_path_rate": 0.1})  # DINO's own
    assert (dino.data, dino.seed, dino.optim.lr, dino.optim.warmup_epochs) == (bt.data, bt.seed, bt.optim.lr,
                                                                                bt.optim.warmup_epochs)
    assert dino.callbacks.emergence and dino.callbacks.jaccard_protocol == bt.callbacks.jaccard_protocol


# --------------------------------------------------------------------------------------- convergence
@pytest.mark.parametrize("curve, expected", [
    ([0.1, 0.3, 0.2], True),                      # best before the last epoch
    ([0.1, 0.2, 0.3], False),                     # still climbing
    ([0.1] + [0.300] * 8 + [0.301], True),        # best last, but the final fifth gained 0.001 < 0.002
    ([0.1] + [0.300] * 8 + [0.303], False),       # ... gained 0.003
    ([0.2, 0.2, 0.2], True),                      # ties: the first is main.py's best checkpoint
    ([], False),
])
def test_converged(curve, expected):
    assert method_study.converged(curve) is expected


def write_curve(path: Path, curve: list[float], fg: float = 0.05) -> None:
    path.mkdir(parents=True, exist_ok=True)
    with (path / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["epoch", "step", "val/mIoU", "val/mIoU_fg"])
        writer.writeheader()
        writer.writerows({"epoch": e, "step": 10 * (e + 1), "val/mIoU": v, "val/mIoU_fg": fg} for e, v in enumerate(curve))


def test_rates_ending_still_improving_are_trained_again_with_twice_the_epochs(tmp_path):
    curves = {(0.1, 4): [0.1, 0.2, 0.3, 0.4], (0.1, 8): [0.1, 0.2, 0.5, 0.4, 0.4, 0.4, 0.4, 0.4],
              (0.01, 4): [0.1, 0.2, 0.3, 0.4], (0.01, 8): [0.1 * i for i in range(8)]}
    calls = []

    def train(lr, epochs, path):
        calls.append((lr, epochs))
        write_curve(path, curves[(lr, epochs)])

    outcomes = method_study.probe_rates(tmp_path, "row", "linear", [0.1, 0.01], 4, 8, train)
    assert calls == [(0.1, 4), (0.1, 8), (0.01, 4), (0.01, 8)]
    assert [(o.lr, o.epochs, o.converged, o.best_epoch) for o in outcomes] == [(0.1, 8, True, 2), (0.01, 8, False, 7)]
    # Finished probes are read back, never trained again; report-only mode trains nothing.
    again = method_study.probe_rates(tmp_path, "row", "linear", [0.1, 0.01], 4, 8, train)
    assert calls == [(0.1, 4), (0.1, 8), (0.01, 4), (0.01, 8)]
    assert [(o.lr, o.epochs, o.best) for o in again] == [(o.lr, o.epochs, o.best) for o in outcomes]
    assert method_study.probe_rates(tmp_path, "other", "linear", [0.1], 4, 8, None) == []


def test_report_takes_the_best_rate_and_epoch_and_converts_steps_to_epochs(tmp_path):
    run_dir = tmp_path / "pretrain-dino-e2"
    run_dir.mkdir()
    with (run_dir / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["epoch", "step", "time/train_epoch_s", "val/loss", "val/attn_jaccard"])
        writer.writeheader()
        writer.writerows([
            {"epoch": 0, "step": 0, "val/attn_jaccard": 0.20},
            {"epoch": 0, "step": 6, "time/train_epoch_s": 30.0, "val/loss": 5.0},  # logged at each epoch's last step
            {"epoch": 1, "step": 13, "time/train_epoch_s": 10.0, "val/loss": 4.0},
            {"epoch": 1, "step": 14, "val/attn_jaccard": 0.25},  # after the last epoch: 2 × 7 steps
        ])
    (run_dir / "done").write_text("1\n")
    write_curve(method_study.probe_dir(tmp_path, "DINO, 2 epochs", "linear", 0.01, 4), [0.1, 0.3, 0.2, 0.2])
    write_curve(method_study.probe_dir(tmp_path, "DINO, 2 epochs", "linear", 0.1, 4), [0.1, 0.2, 0.4, 0.3], fg=0.07)
    text = method_study.write_report(tmp_path, ["dino"], [2], ["linear"], [0.01, 0.1], 4, 8, floors=False)
    assert "| DINO | 2/2 | 20.0 | 4.0000 | 0: 0.200, 2: 0.250 |" in text
    assert "| DINO, 2 epochs | 0.400 (0.070) lr 0.1 ep 3/4 ↑ |" in text
    with (tmp_path / "results.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["lr"], r["best_mIoU"], r["best_epoch"]) for r in rows] == [("0.01", "0.3", "1"), ("0.1", "0.4", "2")]


def test_study_runs_every_method_at_every_budget_and_probes_wait_for_them(tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(method_study, "run", lambda name, config, flags, *a, **k: calls.append((name, config, flags)) or True)
    assert method_study.main(["--output-dir", str(tmp_path), "--stage", "pretrain", "--budgets", "3,9",
                              "--figure", ""]) == 0
    assert [(name, config) for name, config, _ in calls] == [
        ("pretrain-bt-global-e3", "config/proxy/pretrain.yaml"), ("pretrain-bt-global-e9", "config/proxy/pretrain.yaml"),
        ("pretrain-bt-dense-e3", "config/proxy/pretrain_dense.yaml"),
        ("pretrain-bt-dense-e9", "config/proxy/pretrain_dense.yaml"),
        ("pretrain-dino-e3", "config/proxy/pretrain_dino.yaml"), ("pretrain-dino-e9", "config/proxy/pretrain_dino.yaml")]
    assert calls[-1][2] == ["--trainer.max_epochs=9", "--optim.warmup_epochs=4.5"]  # warmup: half of every budget
    calls.clear()
    method_study.main(["--output-dir", str(tmp_path), "--stage", "pretrain", "--budgets", "8", "--methods", "dino",
                       "--warmup-fraction", "0.25", "--figure", ""])
    assert calls == [("pretrain-dino-e8", "config/proxy/pretrain_dino.yaml", ["--trainer.max_epochs=8",
                                                                               "--optim.warmup_epochs=2"])]
    trained = []
    # the report reads probes back (train None) whatever ran; only training calls count here
    monkeypatch.setattr(method_study, "probe_rates",
                        lambda out, row, head, lrs, e, m, train: (train and trained.append(row)) or [])
    method_study.main(["--output-dir", str(tmp_path), "--stage", "probe", "--budgets", "3", "--methods", "dino",
                       "--no-floors", "--figure", ""])
    assert "probes of pretrain-dino-e3: that pretraining run has not finished" in capsys.readouterr().out
    assert trained == []


def test_unknown_method_is_one_line(capsys):
    assert method_study.main(["--methods", "simclr", "--report-only"]) == 2
    assert capsys.readouterr().err.strip() == "error: --methods: unknown simclr; valid: bt-global, bt-dense, dino, vicreg"
