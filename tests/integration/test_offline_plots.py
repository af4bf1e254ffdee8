"""``dvc plots show`` offline: the page loads no remote script, and its charts render without one.

A fresh git + DVC repo with a loss curve as the stages write it (its CSV and PNG):
``posttrain plots``'s ``show`` installs the template and runs the real ``dvc plots show``. The
page must reference nothing remote, carry vega inline, and its vega spec must render to a
non-blank image with vl-convert (the same vega, no browser, no network).
"""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

import pytest

from components.training.callbacks import write_history_plots
from flows.offline_plots import show
from tests.conftest import ROOT, sh

pytestmark = pytest.mark.slow


def test_dvc_plots_page_is_self_contained_and_renders(tmp_path: Path) -> None:
    import vl_convert as vlc
    from PIL import Image

    repo = tmp_path / "repo"
    (repo / "plots").mkdir(parents=True)
    with (ROOT / "plots/sft_loss.csv").open() as fh:  # the shipped run's curve
        rows = [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(fh)]
    write_history_plots(repo / "plots", "sft", rows, ["loss"])
    (repo / "dvc.yaml").write_text(
        "plots:\n- plots/sft_loss.csv:\n    x: step\n    y: loss\n- plots/sft_loss.png\n"
    )
    sh(["git", "init", "-q"], repo)
    sh([sys.executable, "-m", "dvc", "init", "-q"], repo)

    page = show(repo).read_text()
    assert "html_template = plots.html" in (repo / ".dvc/config").read_text()
    assert not re.search(r"<script[^>]*\bsrc=", page), "a script is loaded from somewhere"
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", page), "a remote reference"
    assert "window.vegaEmbed=" in page
    assert "sft_loss.png" in page or "data:image/png" in page

    specs = [json.loads(m) for m in re.findall(r"var spec = (\{.*?\});\n", page, flags=re.S)]
    assert len(specs) == 1
    fields = {d.get("rev") or d.get("field") for d in specs[0]["data"]["values"]} | {
        k for d in specs[0]["data"]["values"] for k in d
    }
    assert "loss" in fields, fields
    png = tmp_path / "spec.png"
    png.write_bytes(vlc.vegalite_to_png(specs[0]))
    pixels = Image.open(png).convert("L")
    extrema = pixels.getextrema()
    assert extrema[0] < 128 < extrema[1], f"a blank chart: {extrema}"
