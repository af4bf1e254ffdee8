"""Write the binary documents shipped in ``data/docs`` (two PDFs and one DOCX).

Why a script: binary files cannot be reviewed in a diff, so their content lives here as
plain text and the files are regenerated from it. The PDFs are written by hand (PDF 1.4,
the standard Helvetica fonts, one content stream per page, a correct xref table) so that
no PDF library is needed and the output is byte-for-byte reproducible; pdfminer, and so
``unstructured``'s ``strategy="fast"``, extracts their text. The DOCX is written with
python-docx and its zip entries get a fixed timestamp so re-running changes no bytes.

Run from the project root:  ``.venv/bin/python tools/make_docs.py``
"""

from __future__ import annotations

import io
import textwrap
import zipfile
from datetime import datetime
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "data" / "docs"

# A page is a list of blocks: ("h1" | "h2" | "p", text).
Page = list[tuple[str, str]]

TRADE_REPORT: list[Page] = [
    [
        ("h1", "Annual Trade Report 2025"),
        ("p", "Federation of Southern States - Office of Trade Statistics"),
        (
            "p",
            "This report summarises the exports of five member states in 2025. Figures are in "
            "tonnes unless stated otherwise and were collected at the ports of each capital.",
        ),
        ("h2", "Satipia"),
        (
            "p",
            "Satipia, whose capital is Vepuvu, exported 41,000 tonnes of copper in 2025, up from "
            "35,500 tonnes in 2024. Almost all of it left through the deep-water port of Vepuvu, "
            "and the copper mines of the Ardel hills employ one worker in nine.",
        ),
        ("h2", "Sereveand"),
        (
            "p",
            "Sereveand shipped 12,300 tonnes of black tea from its capital Guni. A late frost in "
            "March cut the first harvest by a fifth, but prices rose enough to keep export revenue "
            "level with the year before.",
        ),
        ("h2", "Binia"),
        (
            "p",
            "Binia and its capital Nilaga remain the federation's textile centre: 2.4 million "
            "metres of woven cotton were sold abroad, most of it to the northern markets.",
        ),
    ],
    [
        ("h2", "Neleand"),
        (
            "p",
            "Neleand, with its capital Niva, exported 88,000 cubic metres of sawn timber. "
            "A new rule requires two trees to be planted for every tree felled.",
        ),
        ("h2", "Meneand"),
        (
            "p",
            "Meneand's capital Donota is the federation's only source of glass sand. Exports "
            "reached 19,700 tonnes, and a second kiln opened in Donota in September.",
        ),
        ("h2", "Outlook for 2026"),
        (
            "p",
            "The office expects copper prices to fall slightly in 2026 and tea exports to recover "
            "once the new irrigation canals near Guni are finished.",
        ),
    ],
]

HISTORY: list[Page] = [
    [
        ("h1", "A Short History of Six Capitals"),
        (
            "p",
            "The capitals of the eastern coast grew from very different beginnings: a fishing "
            "village, a fortress, a river crossing. This booklet tells each story in brief.",
        ),
        ("h2", "Veruni, capital of Febeel"),
        (
            "p",
            "Veruni was founded in 1214 by herring fishermen who built their huts on the dunes. "
            "It became the capital of Febeel in 1390, when Queen Amsel moved her court there.",
        ),
        ("h2", "Peme, capital of Pufaia"),
        (
            "p",
            "Peme has been the capital of Pufaia only since 1802. The great flood of 1801 "
            "destroyed the old capital on the delta, and the government moved to the hill town "
            "of Peme, which had never flooded.",
        ),
        ("h2", "Vuli, capital of Bigiel"),
        (
            "p",
            "Vuli grew around a stone bridge, the only crossing of the river Tam for a hundred "
            "kilometres. The bridge, finished in 1122, still carries traffic today.",
        ),
    ],
    [
        ("h2", "Zufufu, capital of Zebinuel"),
        (
            "p",
            "Zufufu began as a fortress guarding the mountain pass. Its seven towers were built "
            "between 1450 and 1490 and gave the city its nickname, the Seven Crowns.",
        ),
        ("h2", "Vefe, capital of Zoveel"),
        (
            "p",
            "Vefe was a trading post of the salt merchants. It received its city charter in 1567 "
            "and its first printing press in 1602.",
        ),
        ("h2", "Vapage, capital of Rapaluel"),
        (
            "p",
            "Vapage is the youngest of the six capitals. It was planned on a grid in 1911, and the "
            "parliament building on Grid Square was opened in 1923.",
        ),
    ],
]

CLIMATE_TITLE = "Climate Almanac of the Northern Plateau"
CLIMATE_SECTIONS: list[tuple[str, str]] = [
    (
        "Bapopaia",
        "Lupupe, the capital of Bapopaia, has a monsoon climate. Four fifths of its yearly rain "
        "falls between June and September, and the river port closes for two weeks in August.",
    ),
    (
        "Nupopeel",
        "Pezofo, the capital of Nupopeel, is the coldest capital on the plateau. Its record low "
        "is minus 31 degrees Celsius, measured on 14 January 1987.",
    ),
    (
        "Molaa",
        "Desiva is the capital of Molaa. Dry winds from the south give it more than 300 sunny "
        "days a year, and it has the plateau's largest solar farm.",
    ),
    (
        "Tifia",
        "Gamofe, the capital of Tifia, lies in a foggy valley: on average the fog does not lift "
        "before eleven in the morning on 90 days of the year.",
    ),
]
CLIMATE_TABLE: list[tuple[str, str, str, str]] = [
    ("Capital", "Country", "January mean (C)", "July mean (C)"),
    ("Lupupe", "Bapopaia", "18", "27"),
    ("Pezofo", "Nupopeel", "-14", "16"),
    ("Desiva", "Molaa", "6", "29"),
    ("Gamofe", "Tifia", "2", "19"),
]


def _pdf_string(text: str) -> str:
    """A PDF literal string: escape the three characters that are special inside ``( )``."""
    text.encode("latin-1")  # the standard fonts with WinAnsiEncoding cover Latin-1 only
    return "(" + text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") + ")"


def _content_stream(page: Page) -> bytes:
    """Text operators for one page: headings in Helvetica-Bold, wrapped body text in Helvetica.

    Paragraphs are separated by a blank line's worth of space so pdfminer puts each paragraph
    in its own text box (its default ``line_margin`` splits on gaps of half a line height).
    """
    styles = {"h1": ("F2", 18, 40), "h2": ("F2", 13, 70), "p": ("F1", 11, 88)}
    y = 740.0
    ops: list[str] = []
    for kind, text in page:
        font, size, width = styles[kind]
        leading = size * 1.3
        y -= size * 0.8 if kind != "p" else 0
        for line in textwrap.wrap(text, width=width):
            ops.append(f"BT /{font} {size} Tf 72 {y:.1f} Td {_pdf_string(line)} Tj ET")
            y -= leading
        y -= leading
    return "\n".join(ops).encode("latin-1")


def write_pdf(path: Path, pages: list[Page], title: str) -> None:
    """Write a minimal PDF 1.4: catalog, page tree, two standard fonts, one stream per page."""
    objects: list[bytes] = []  # object number i + 1

    def add(body: bytes) -> int:
        objects.append(body)
        return len(objects)

    catalog = add(b"")  # filled in once the page tree number is known
    pages_obj = add(b"")
    font_regular = add(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>")
    font_bold = add(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica-Bold /Encoding /WinAnsiEncoding >>")
    info = add(
        f"<< /Title {_pdf_string(title)} /Producer (posttrain tools/make_docs.py) >>".encode("latin-1")
    )
    page_numbers = []
    for page in pages:
        stream = _content_stream(page)
        content = add(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
        page_numbers.append(
            add(
                (
                    f"<< /Type /Page /Parent {pages_obj} 0 R /MediaBox [0 0 612 792] "
                    f"/Resources << /Font << /F1 {font_regular} 0 R /F2 {font_bold} 0 R >> >> "
                    f"/Contents {content} 0 R >>"
                ).encode()
            )
        )
    objects[catalog - 1] = f"<< /Type /Catalog /Pages {pages_obj} 0 R >>".encode()
    kids = " ".join(f"{n} 0 R" for n in page_numbers)
    objects[pages_obj - 1] = f"<< /Type /Pages /Kids [{kids}] /Count {len(page_numbers)} >>".encode()

    out = io.BytesIO()
    out.write(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n" % number + body + b"\nendobj\n")
    xref = out.tell()
    out.write(b"xref\n0 %d\n" % (len(objects) + 1))
    out.write(b"0000000000 65535 f \n")
    for offset in offsets:
        out.write(b"%010d 00000 n \n" % offset)
    out.write(
        b"trailer\n<< /Size %d /Root %d 0 R /Info %d 0 R >>\nstartxref\n%d\n%%%%EOF\n"
        % (len(objects) + 1, catalog, info, xref)
    )
    path.write_bytes(out.getvalue())


def write_docx(path: Path) -> None:
    """Write the climate almanac with python-docx, then pin zip timestamps and core dates."""
    import docx

    document = docx.Document()
    fixed = datetime(2025, 1, 1)
    document.core_properties.created = fixed
    document.core_properties.modified = fixed
    document.core_properties.title = CLIMATE_TITLE
    document.add_heading(CLIMATE_TITLE, level=1)
    document.add_paragraph(
        "Yearly weather notes for four capitals of the northern plateau, with mean temperatures "
        "for the coldest and the warmest month."
    )
    for country, text in CLIMATE_SECTIONS:
        document.add_heading(country, level=2)
        document.add_paragraph(text)
    document.add_heading("Mean temperatures", level=2)
    table = document.add_table(rows=0, cols=len(CLIMATE_TABLE[0]))
    for row in CLIMATE_TABLE:
        cells = table.add_row().cells
        for cell, value in zip(cells, row, strict=True):
            cell.text = value
    raw = io.BytesIO()
    document.save(raw)
    raw.seek(0)
    pinned = io.BytesIO()
    with zipfile.ZipFile(raw) as src, zipfile.ZipFile(pinned, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            info = zipfile.ZipInfo(item.filename, date_time=(2025, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            dst.writestr(info, src.read(item.filename))
    path.write_bytes(pinned.getvalue())


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    write_pdf(OUT / "trade-report-2025.pdf", TRADE_REPORT, "Annual Trade Report 2025")
    write_pdf(OUT / "history-of-six-capitals.pdf", HISTORY, "A Short History of Six Capitals")
    write_docx(OUT / "climate-almanac.docx")
    for name in ("trade-report-2025.pdf", "history-of-six-capitals.pdf", "climate-almanac.docx"):
        print(f"wrote {OUT / name} ({(OUT / name).stat().st_size} bytes)")


if __name__ == "__main__":
    main()
