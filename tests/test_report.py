"""tools/report.py: one self-contained HTML page per run, rendered in a real headless Chromium.

The browser check injects two scripts into a copy of the page: an error listener first (capturing script
errors and failed resource loads) and, at the end, a check that writes every image's load state into the DOM,
which ``chromium --dump-dom`` prints. A copy with one image deliberately broken must be caught (the check can
fail)."""
from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import main
from tools import report

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (`apt-get install -y chromium`; .ci/run installs it)")

ERRORS = ("<script>window.__errors=[];window.addEventListener('error',function(e){window.__errors.push("
          "e.message||('failed to load '+(e.target&&e.target.tagName)))},true);</script>")
CHECK = ("<script>window.addEventListener('load',function(){var imgs=Array.from(document.images);"
         "var out={images:imgs.length,loaded:imgs.filter(function(i){return i.complete&&i.naturalWidth>0}).length,"
         "widths:imgs.map(function(i){return i.naturalWidth}),errors:window.__errors};"
         "var pre=document.createElement('pre');pre.id='check';pre.textContent=JSON.stringify(out);"
         "document.body.appendChild(pre);});</script>")


@pytest.fixture(scope="module")
def run_dir(data_cache, tmp_path_factory) -> Path:
    from tests.conftest import tiny_args

    out = tmp_path_factory.mktemp("report_runs")
    assert main.main(tiny_args(data_cache, out, "rep", trainer__max_epochs=2, callbacks__every_n_epochs=1,
                               callbacks__emergence="false", log__wandb_mode="disabled")) == 0
    return out / "rep"


def browser_check(page: Path, tmp_path: Path) -> dict:
    text = page.read_text(encoding="utf-8")
    probe = tmp_path / f"probe_{page.name}"
    probe.write_text(text.replace("<head>", "<head>" + ERRORS, 1).replace("</body>", CHECK + "</body>", 1),
                     encoding="utf-8")
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=10000", "--dump-dom",
         probe.as_uri()], capture_output=True, text=True, timeout=120)
    match = re.search(r'<pre id="check">(.*?)</pre>', result.stdout, re.S)
    assert match, f"the page's check did not run: {result.stderr[-2000:]}"
    return json.loads(html.unescape(match.group(1)))


def test_report_holds_config_scores_commands_curves_and_every_picture(run_dir):
    path = report.write_report(run_dir)
    assert path == run_dir / "report.html"
    page = path.read_text(encoding="utf-8")
    pictures = sorted(p.name for p in (run_dir / "media").glob("*.png"))
    assert len(pictures) >= 5  # attention and cross-correlation at epochs 0 and 1, cross-correlation before training
    # self-contained: every image embedded, nothing fetched from anywhere
    sources = re.findall(r"<img src='([^']*)'", page)
    assert len(sources) == len(pictures) + 1  # + the curves
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert "http://" not in page and "https://" not in page and "<script" not in page
    for name in pictures:
        assert f"<b>{name}</b>" in page
    assert "epoch 1: CLS-token attention" in page and "before training: Barlow Twins cross-correlation" in page
    # the monitored metric with its best and final values, as metrics.csv says (val/loss, lower is better)
    import csv

    with (run_dir / "metrics.csv").open(newline="") as f:
        val = [(int(r["step"]), float(r["val/loss"])) for r in csv.DictReader(f) if r.get("val/loss")]
    best = min(val, key=lambda sv: sv[1])
    assert f"<td>val/loss (lower is better)</td><td>{best[1]:.4f} (step {best[0]}" in page
    assert f"<td>{val[-1][1]:.4f} (step {val[-1][0]})</td>" in page
    assert "2 of 2 epochs, 8 optimizer steps (finished)" in page
    # commands to resume and to reproduce
    assert f"python main.py --trainer.resume {run_dir}</code>" in page
    assert f"python main.py --config {run_dir / 'config.yaml'} --log.run_name rep-again" in page
    # the config, the values that differ from the defaults marked (the tiny ViT's depth 2; default 0)
    assert "<span class='changed'>  depth: 2  # default: 0</span>" in page
    assert "<li><code>depth: 2  # default: 0</code></li>" in page


@needs_chromium
def test_report_renders_in_chromium_every_image_loaded_no_script_error(run_dir, tmp_path):
    path = report.write_report(run_dir, tmp_path / "report.html")
    check = browser_check(path, tmp_path)
    assert check["images"] == len(list((run_dir / "media").glob("*.png"))) + 1
    assert check["loaded"] == check["images"] and min(check["widths"]) > 0
    assert check["errors"] == []
    # the check catches a broken picture
    broken = tmp_path / "broken.html"
    page = path.read_text(encoding="utf-8")
    broken.write_text(page.replace("data:image/png;base64,", "data:image/png;base64,AAAA", 1), encoding="utf-8")
    check = browser_check(broken, tmp_path)
    assert check["loaded"] == check["images"] - 1 and check["errors"]


def test_not_a_run_directory_is_one_line(tmp_path):
    for target, expected in [(tmp_path / "missing", "no such run directory"),
                             (tmp_path, "is not a run directory: it holds no config.yaml")]:
        result = subprocess.run([sys.executable, "-m", "tools.report", str(target)], cwd=ROOT, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
