"""The image task: procedurally drawn shapes with questions a verifier can grade exactly.

Each scene is a white square canvas with one to ``max_objects`` shapes (circle, square,
triangle) in four colours, one shape per cell of a 3x3 grid. The questions have one-word
answers, so grading is exact match:

- ``colour``: "what colour is the triangle?" (asked only of a shape that appears once);
- ``count``: "how many circles are there?" (0 to ``max_objects``);
- ``left_of``: "is the square left of the circle?" (two shapes that appear once, in different columns);
- ``shape``: "which shape is blue?" (a colour that appears once).

Every scene also has a caption ("a red circle, a blue square", left to right), for
caption-style training. Everything derives from a seed: the same params draw the same pixels.
Users bring their own data as JSONL lines ``{"image": path, "question", "answer"}`` (a path
relative to the JSONL's folder), validated line by line with ``file:line`` errors.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from components.data.jsonl import iter_jsonl
from components.errors import DataError, MissingInputError

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (240, 200, 20)}
KINDS = ("colour", "count", "left_of", "shape")
GRID = 3
MIN_IMAGE_SIDE = 32  # smaller images carry too little for the encoder: rejected, not upscaled
IMAGE_MARKER = "<image>"  # where an image sits in a prompt's text


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    row: int
    col: int


@dataclass(frozen=True)
class Example:
    """One graded question about one image (``image`` is a path; ``kind`` is ``user`` for imported data)."""

    image: str
    question: str
    answer: str
    kind: str = "user"
    caption: str = ""

    def record(self) -> dict[str, str]:
        return {k: v for k, v in self.__dict__.items() if v != ""}


def random_scene(rng: random.Random, max_objects: int) -> list[Shape]:
    cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], rng.randint(1, max_objects))
    return [Shape(rng.choice(SHAPES), rng.choice(list(COLOURS)), r, c) for r, c in cells]


def draw(scene: list[Shape], size: int, rng: random.Random):  # noqa: ANN201 - a PIL.Image.Image
    """The scene as an RGB image: each shape near its cell's centre, slightly jittered in place and size."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (255, 255, 255))
    pen = ImageDraw.Draw(image)
    cell = size / GRID
    for s in scene:
        radius = cell * rng.uniform(0.28, 0.38)
        cx = (s.col + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
        cy = (s.row + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        fill = COLOURS[s.colour]
        if s.kind == "circle":
            pen.ellipse(box, fill=fill)
        elif s.kind == "square":
            pen.rectangle(box, fill=fill)
        else:
            pen.polygon(
                [(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill
            )
    return image


def caption(scene: list[Shape]) -> str:
    ordered = sorted(scene, key=lambda s: (s.col, s.row))
    return ", ".join(f"a {s.colour} {s.kind}" for s in ordered)


def questions(scene: list[Shape], rng: random.Random) -> dict[str, tuple[str, str]]:
    """Every question kind this scene can answer unambiguously: kind -> (question, answer)."""
    counts = Counter(s.kind for s in scene)
    colours = Counter(s.colour for s in scene)
    unique = [s for s in scene if counts[s.kind] == 1]
    out: dict[str, tuple[str, str]] = {}
    if unique:
        s = rng.choice(unique)
        out["colour"] = (f"what colour is the {s.kind}?", s.colour)
    kind = rng.choice(SHAPES)
    out["count"] = (f"how many {kind}s are there?", str(counts[kind]))
    pairs = [(a, b) for a in unique for b in unique if a.kind != b.kind and a.col != b.col]
    if pairs:
        a, b = rng.choice(pairs)
        out["left_of"] = (f"is the {a.kind} left of the {b.kind}?", "yes" if a.col < b.col else "no")
    single = [s for s in scene if colours[s.colour] == 1]
    if single:
        s = rng.choice(single)
        out["shape"] = (f"which shape is {s.colour}?", s.kind)
    return out


def generate(
    out_dir: Path, split: str, n: int, seed: int, image_size: int, max_objects: int
) -> list[Example]:
    """Draw ``n`` scenes into ``out_dir/images`` and return one question per scene, kinds in rotation.

    The kind rotates so every kind is equally common; a scene that cannot answer its turn's kind
    is redrawn (seeded, so still deterministic).
    """
    rng = random.Random(f"{seed}:{split}")
    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    examples: list[Example] = []
    while len(examples) < n:
        kind = KINDS[len(examples) % len(KINDS)]
        scene = random_scene(rng, max_objects)
        asked = questions(scene, rng)
        if kind not in asked:
            continue
        name = f"images/{split}_{len(examples):05d}.png"
        draw(scene, image_size, rng).save(out_dir / name, format="PNG", optimize=False)
        question, answer = asked[kind]
        examples.append(Example(name, question, answer, kind, caption(scene)))
    return examples


def load_examples(path: Path | str) -> list[Example]:
    """Read ``{"image", "question", "answer"}`` lines; a bad line names its file and line.

    Image paths are resolved against the JSONL's folder; a missing image is an error at its line.
    """
    path = Path(path)
    examples: list[Example] = []
    for number, obj in iter_jsonl(path):
        where = f"{path}:{number}"
        for key in ("image", "question", "answer"):
            if not isinstance(obj.get(key), str) or not obj[key].strip():
                raise DataError(f"{where}: field {key!r} must be a non-empty string")
        image = path.parent / obj["image"]
        if not image.is_file():
            raise MissingInputError(f"{where}: image {obj['image']!r} not found (looked at {image})")
        examples.append(
            Example(
                str(image),
                obj["question"].strip(),
                obj["answer"].strip(),
                str(obj.get("kind", "user")),
                str(obj.get("caption", "")),
            )
        )
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def load_image(path: Path | str, size: int) -> torch.Tensor:
    """An image file as a 3 x size x size tensor in [0, 1], or a clear error naming the file.

    Documented conversions: any mode becomes RGB (transparency is composited on white, palette
    and greyscale expanded), and any size is resized to ``size`` x ``size`` (bilinear; a
    non-square image is stretched). Images smaller than 32 px on a side are rejected: there is
    too little in them to upscale.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{path}: image not found")
    try:
        with Image.open(path) as opened:
            opened.load()
            image = opened
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: not a readable image ({exc.__class__.__name__}: {exc})") from None
    if min(image.size) < MIN_IMAGE_SIDE:
        raise DataError(
            f"{path}: image is {image.size[0]}x{image.size[1]} px; "
            f"at least {MIN_IMAGE_SIDE} px a side is needed"
        )
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3)
    return data.permute(2, 0, 1).float() / 255.0


def majority_accuracy(train: list[Example], test: list[Example]) -> float:
    """The best an answer that ignores the image can do: each question's most common training answer."""
    by_question: dict[str, Counter[str]] = {}
    for ex in train:
        by_question.setdefault(ex.question, Counter())[ex.answer] += 1
    overall = Counter(ex.answer for ex in train).most_common(1)[0][0]
    hits = [
        (by_question[ex.question].most_common(1)[0][0] if ex.question in by_question else overall)
        == ex.answer
        for ex in test
    ]
    return sum(hits) / max(len(hits), 1)


def as_records(examples: list[Example]) -> list[dict[str, Any]]:
    return [ex.record() for ex in examples]
