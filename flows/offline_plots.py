"""``dvc plots show`` without a network: an HTML template with vega inlined.

DVC's page loads vega, vega-lite and vega-embed from a CDN (its ``{scripts}`` placeholder), so
offline it renders blank. DVC lets a repo name its own template (``plots.html_template`` in
``.dvc/config``, a path relative to ``.dvc/``); ours has no ``{scripts}`` placeholder, so
those CDN tags are never inserted, and inlines instead the self-contained bundle that
``vl-convert-python`` (a PyPI wheel) builds of the same three libraries, which sets
``window.vegaEmbed`` before DVC's plot divs call it. ``make setup`` writes it once
(``python -m flows.offline_plots``); ``posttrain plots`` writes it if missing and renders.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from components.artifacts import write_text_atomic

TEMPLATE_NAME = "plots.html"  # under .dvc/, as .dvc/config's plots.html_template names it

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>posttrain plots</title>
    <!-- vega {vega}, vega-lite {vega_lite}, vega-embed {vega_embed}: inlined, no network -->
    <script type="text/javascript">
__BUNDLE__
    </script>
    <style>
        body { font-family: sans-serif; }
        table { border-spacing: 15px; }
        img { max-width: 640px; }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def template_text() -> str:
    import vl_convert as vlc

    versions = {
        "{vega}": vlc.get_vega_version(),
        "{vega_lite}": vlc.get_vegalite_versions()[-1],
        "{vega_embed}": vlc.get_vega_embed_version(),
    }
    page = PAGE
    for key, value in versions.items():
        page = page.replace(key, value)
    return page.replace("__BUNDLE__", vlc.javascript_bundle())


def install_template(repo_dir: Path | str = ".") -> Path:
    """Write ``.dvc/plots.html`` and point ``.dvc/config``'s ``plots.html_template`` at it."""
    repo = Path(repo_dir)
    dest = repo / ".dvc" / TEMPLATE_NAME
    write_text_atomic(dest, template_text())
    subprocess.run(
        [sys.executable, "-m", "dvc", "config", "plots.html_template", TEMPLATE_NAME],
        cwd=repo,
        check=True,
        capture_output=True,
    )
    return dest


def show(repo_dir: Path | str = ".", out: str = "dvc_plots") -> Path:
    """``dvc plots show`` with the offline template (installed first if missing); the page's path."""
    repo = Path(repo_dir)
    if not (repo / ".dvc" / TEMPLATE_NAME).is_file():
        install_template(repo)
    subprocess.run(
        [sys.executable, "-m", "dvc", "plots", "show", "-o", out], cwd=repo, check=True, capture_output=True
    )
    return repo / out / "index.html"


if __name__ == "__main__":
    print(install_template(sys.argv[1] if len(sys.argv) > 1 else "."))
