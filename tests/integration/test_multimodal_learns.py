"""Both bridges learn to see: on held-out images, each answers colour questions far above what
any image-blind answer can reach, through the real frozen MobileNetV2 and a frozen Llama."""

from __future__ import annotations

import pytest
import torch

from components.multimodal import shapes, vision
from components.multimodal.bridging import BareLM, PromptFormat, accuracy, greedy_answers, train_bridge
from components.multimodal.flamingo import FlamingoLM, FlamingoShape, marker_ids
from components.multimodal.palme import PalmeLM, PalmeShape
from tests.unit.test_multimodal import tiny_lm

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory):
    from components.models.tiny import build_tokenizer

    root = tmp_path_factory.mktemp("shapes")
    train = [e for e in shapes.generate(root, "train", 1200, 0, 96, 3) if e.kind == "colour"]
    test = [e for e in shapes.generate(root, "eval", 240, 0, 96, 3) if e.kind == "colour"]
    encoder = vision.frozen_encoder()
    feats = {
        name: vision.encode(encoder, [shapes.load_image(root / e.image, 96) for e in split])
        for name, split in (("train", train), ("test", test))
    }
    tokenizer = build_tokenizer([e.question + " " + e.answer for e in train], vocab_size=300)
    fmt = PromptFormat(tokenizer)
    rows = [
        fmt.row(f"{shapes.IMAGE_MARKER} {e.question}", [feats["train"][i]], e.answer)
        for i, e in enumerate(train)
    ]
    test_rows = [
        fmt.row(f"{shapes.IMAGE_MARKER} {e.question}", [feats["test"][i]]) for i, e in enumerate(test)
    ]
    return {"train": train, "test": test, "rows": rows, "test_rows": test_rows, "fmt": fmt}


def answer(bridge, task) -> float:
    fmt = task["fmt"]
    ids = greedy_answers(bridge, task["test_rows"], fmt.stop_ids)
    return accuracy(
        [fmt.tokenizer.decode(a, skip_special_tokens=True) for a in ids], [e.answer for e in task["test"]]
    )


def blind_and_text_only(task) -> tuple[float, float]:
    fmt = task["fmt"]
    bare = BareLM(tiny_lm(fmt.tokenizer), fmt.tokenizer.pad_token_id)
    text_rows = [fmt.row(e.question, []) for e in task["test"]]
    ids = greedy_answers(bare, text_rows, fmt.stop_ids)
    text_only = accuracy(
        [fmt.tokenizer.decode(a, skip_special_tokens=True) for a in ids], [e.answer for e in task["test"]]
    )
    return shapes.majority_accuracy(task["train"], task["test"]), text_only


@pytest.mark.parametrize("method", ["flamingo", "palme"])
def test_bridge_beats_the_blind_baselines_by_030(task, method):
    tokenizer = task["fmt"].tokenizer
    lm = tiny_lm(tokenizer)
    torch.manual_seed(0)
    if method == "flamingo":
        shape = FlamingoShape(dim=64, num_latents=8, heads=4, every=1)
        bridge = FlamingoLM(lm, shape, marker_ids(tokenizer), tokenizer.pad_token_id)
    else:
        bridge = PalmeLM(lm, PalmeShape(hidden=128, grid=3, lm="lora"))
    frozen = {n: p.detach().clone() for n, p in bridge.lm.named_parameters() if not p.requires_grad}
    lr = 3e-3
    train_bridge(bridge, task["rows"], steps=300, batch_size=16, learning_rate=lr, seed=0,
                 fast_names=("attn_gate", "ff_gate"), fast_multiplier=10.0)  # fmt: skip
    blind, text_only = blind_and_text_only(task)
    got = answer(bridge, task)
    assert got >= max(blind, text_only) + 0.30, (got, blind, text_only)
    assert all(torch.equal(p, frozen[n]) for n, p in bridge.lm.named_parameters() if n in frozen)
