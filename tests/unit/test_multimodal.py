"""The multimodal bridges on a tiny random Llama: Flamingo's transparency at init, its resampler
and media masking, PaLM-E's splice, what trains and what stays frozen, the encoder's weights,
the shapes task and every bad input named in the issue."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from components.errors import DataError, MissingInputError
from components.models.tiny import build_tokenizer
from components.multimodal import shapes, vision
from components.multimodal.bridging import (
    BareLM,
    PromptFormat,
    Row,
    answer_loss,
    check_fits,
    greedy_answers,
    left_pad,
    load_trainable,
    save_trainable,
    train_bridge,
)
from components.multimodal.flamingo import FlamingoLM, FlamingoShape, PerceiverResampler, marker_ids
from components.multimodal.palme import PalmeLM, PalmeShape, pool_grid

FEATURES = 16  # small fake feature vectors keep these tests fast; the real encoder has 1280


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["what colour is the triangle? red green blue yellow", "how many circles are there? 0 1 2 3"] * 20
    return build_tokenizer(texts, vocab_size=300)


def tiny_lm(tokenizer, context: int = 256) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=context,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config).eval()


def flamingo(tokenizer, lm=None) -> FlamingoLM:
    shape = FlamingoShape(feature_dim=FEATURES, dim=16, num_latents=4, heads=4, every=1)
    torch.manual_seed(1)
    return FlamingoLM(lm or tiny_lm(tokenizer), shape, marker_ids(tokenizer), tokenizer.pad_token_id)


def palme(tokenizer, lm_mode: str = "frozen") -> PalmeLM:
    torch.manual_seed(1)
    return PalmeLM(tiny_lm(tokenizer), PalmeShape(feature_dim=FEATURES, hidden=32, grid=2, lm=lm_mode))


def image(seed: int, n: int = 9) -> torch.Tensor:
    return torch.randn(n, FEATURES, generator=torch.Generator().manual_seed(seed))


def rows(tokenizer, n: int = 4) -> list[Row]:
    fmt = PromptFormat(tokenizer)
    return [
        fmt.row(f"{shapes.IMAGE_MARKER} what colour is the triangle?", [image(i)], "red") for i in range(n)
    ]


# ------------------------------------------------------------------ Flamingo


def test_flamingo_at_init_equals_the_frozen_lm_exactly(tokenizer):
    lm = tiny_lm(tokenizer)
    bridge = flamingo(tokenizer, lm)
    batch = rows(tokenizer)
    ids, mask, pos = left_pad([torch.tensor(bridge.sequence(r)[0]) for r in batch], tokenizer.pad_token_id)
    with torch.no_grad():
        bare = lm(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        with_images = bridge.forward_rows(batch)
        text_only = bridge.forward_rows([replace(r, images=[]) for r in batch])
    assert (with_images - bare).abs().max().item() == 0.0  # images present, gates closed
    assert (text_only - bare).abs().max().item() == 0.0
    # the check has teeth: an open gate changes the logits
    with torch.no_grad():
        bridge.blocks["0"].attn_gate.fill_(1.0)
        assert (bridge.forward_rows(batch) - bare).abs().max().item() > 1e-4


@pytest.mark.parametrize("count", [1, 3, 7])
def test_resampler_gives_the_same_shape_for_any_number_of_frames_or_features(count):
    resampler = PerceiverResampler(FlamingoShape(feature_dim=FEATURES, dim=16, num_latents=5, heads=4))
    frames = resampler(torch.randn(2, count, 9, FEATURES))  # count frames of a 3x3 map
    cells = resampler(torch.randn(2, (count + 1) ** 2, FEATURES))  # one map of (count+1)^2 cells
    assert frames.shape == cells.shape == (2, 5, 16)


def test_media_masking_each_token_sees_only_the_latest_image(tokenizer):
    bridge = flamingo(tokenizer)
    with torch.no_grad():
        for block in bridge.blocks.values():
            block.attn_gate.fill_(1.0)
            block.ff_gate.fill_(0.0)  # the FFN is applied to every token: isolate the cross-attention
    fmt = PromptFormat(tokenizer)
    text = f"{shapes.IMAGE_MARKER} one {shapes.IMAGE_MARKER} two"
    a = fmt.row(text, [image(1), image(2)])
    b = fmt.row(text, [image(3), image(2)])  # only the first image differs
    ids, media = bridge.sequence(a)
    second = media.index(1)  # the first token that sees image 2
    first = media.index(0)
    with torch.no_grad():
        la, lb = bridge.forward_rows([a]), bridge.forward_rows([b])
    diff = (la - lb).abs().amax(-1)[0]
    assert diff[:first].max() == 0  # before any image: no visual input at all
    assert diff[first:second].max() > 1e-5  # between the images: they see image 1
    # after the second marker, tokens attend to image 2 only; self-attention still carries
    # what earlier tokens saw, so compare the cross-attention block itself on those positions
    visual_a = bridge.resampler(torch.stack(a.images)).reshape(1, -1, 16)
    visual_b = bridge.resampler(torch.stack(b.images)).reshape(1, -1, 16)
    y = torch.randn(1, len(ids), 32)
    index = torch.tensor([media])
    out_a = bridge.blocks["0"](y, visual_a, index, 4)
    out_b = bridge.blocks["0"](y, visual_b, index, 4)
    assert (out_a - out_b)[0, second:].abs().max() == 0
    assert (out_a - out_b)[0, first:second].abs().max() > 1e-5


def test_only_the_bridge_learns_flamingo(tokenizer):
    bridge = flamingo(tokenizer)
    frozen = {n: p.detach().clone() for n, p in bridge.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in bridge.named_parameters() if p.requires_grad}
    assert frozen and before and all(n.startswith("lm.") for n in frozen)
    train_bridge(bridge, rows(tokenizer, 8), steps=6, batch_size=4, learning_rate=1e-2, seed=0,
                 fast_names=("attn_gate", "ff_gate"), fast_multiplier=10.0)  # fmt: skip
    after = dict(bridge.named_parameters())
    assert all(torch.equal(after[n], t) for n, t in frozen.items())
    unmoved = [n for n, t in before.items() if torch.equal(after[n], t)]
    assert not unmoved, unmoved
    assert all(abs(v) > 0 for v in bridge.gates().values())


# ------------------------------------------------------------------ PaLM-E


def test_palme_splices_projected_tokens_where_the_marker_was(tokenizer):
    bridge = palme(tokenizer)
    fmt = PromptFormat(tokenizer)
    row = fmt.row(f"look {shapes.IMAGE_MARKER} what colour is the triangle?", [image(0)], "red")
    embeds = bridge.embed(row)
    assert len(embeds) == bridge.length(row) + len(row.answer)
    assert bridge.length(row) == sum(len(p) for p in row.pieces) + 4  # 3x3 features pooled to 2x2
    start = len(row.pieces[0])
    soft = bridge.visual_tokens(row.images[0])
    assert torch.equal(embeds[start : start + 4], soft)
    table = bridge.lm.get_input_embeddings()
    assert torch.equal(embeds[:start], table(torch.tensor(row.pieces[0])))


def test_pool_grid_averages_cells():
    features = torch.arange(16, dtype=torch.float32).view(16, 1)  # a 4x4 map, values 0..15 row-major
    pooled = pool_grid(features, 2)[:, 0].tolist()
    assert pooled == [2.5, 4.5, 10.5, 12.5]


@pytest.mark.parametrize("lm_mode", ["frozen", "lora"])
def test_only_the_bridge_learns_palme(tokenizer, lm_mode):
    bridge = palme(tokenizer, lm_mode)
    base = {n: p.detach().clone() for n, p in bridge.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in bridge.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in before) == (lm_mode == "lora")
    train_bridge(bridge, rows(tokenizer, 8), steps=5, batch_size=4, learning_rate=1e-2, seed=0)
    after = dict(bridge.named_parameters())
    assert all(torch.equal(after[n], t) for n, t in base.items())
    assert not [n for n, t in before.items() if torch.equal(after[n], t)]


def test_saved_bridge_reloads_to_the_same_logits(tokenizer, tmp_path):
    bridge = flamingo(tokenizer)
    batch = rows(tokenizer)
    train_bridge(bridge, batch, steps=3, batch_size=4, learning_rate=1e-2, seed=0)
    save_trainable(bridge, tmp_path / "bridge.safetensors")
    fresh = flamingo(tokenizer)
    load_trainable(fresh, tmp_path / "bridge.safetensors")
    with torch.no_grad():
        assert torch.equal(bridge.forward_rows(batch), fresh.forward_rows(batch))
    with pytest.raises(Exception, match="do not fit"):
        load_trainable(palme(tokenizer), tmp_path / "bridge.safetensors")


# ------------------------------------------------------------------ shared maths


def test_left_pad_and_answer_loss_by_hand():
    batch, mask, positions = left_pad([torch.tensor([5, 6, 7]), torch.tensor([8])], 0)
    assert batch.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert positions.tolist() == [[0, 1, 2], [0, 0, 0]]
    # vocab 2, one row whose answer is token 1 at the last position: loss = -log softmax(logits[-2])[1]
    logits = torch.tensor([[[0.0, 0.0], [1.0, 3.0], [9.0, 9.0]]])
    loss = answer_loss(logits, [Row([[0, 0]], [], [1])])
    assert loss.item() == pytest.approx(-torch.log_softmax(torch.tensor([1.0, 3.0]), 0)[1].item())


def test_greedy_answers_stop_at_the_end_token(tokenizer):
    class Scripted(torch.nn.Module):  # always says token 7, then the stop token
        lm = tiny_lm(tokenizer)

        def length(self, row):
            return 1

        def forward_rows(self, rows):
            logits = torch.zeros(len(rows), 1, 10)
            for i, r in enumerate(rows):
                logits[i, -1, 7 if len(r.answer) < 2 else 3] = 1.0
            return logits

    assert greedy_answers(Scripted(), [Row([[1]], [])] * 3, stop_ids={3}) == [[7, 7]] * 3


# ------------------------------------------------------------------ encoder


def test_mobilenet_weights_load_strictly_and_are_checked(tmp_path):
    state = vision.pretrained_state_dict()
    encoder = vision.frozen_encoder(state)
    features = vision.encode(encoder, torch.rand(2, 3, 160, 160))
    assert features.shape == (2, 25, vision.FEATURE_DIM)
    assert vision.encode(encoder, torch.rand(1, 3, 224, 224)).shape == (1, 49, vision.FEATURE_DIM)
    assert not any(p.requires_grad for p in encoder.parameters())
    tampered = tmp_path / vision.WEIGHTS_FILE
    tampered.write_bytes(vision.bundled_weights_path().read_bytes()[:-1] + b"\0")
    with pytest.raises(MissingInputError, match="sha256"):
        vision.pretrained_state_dict(tampered)


def test_encoding_in_batches_gives_each_image_its_own_features():
    """The batch size is a speed knob only: an image's features do not depend on its neighbours."""
    encoder = vision.frozen_encoder()
    images = torch.rand(11, 3, 96, 96)
    one_by_one = torch.cat([vision.encode(encoder, images[i : i + 1]) for i in range(len(images))])
    for batch_size in (4, 8, 64):
        torch.testing.assert_close(vision.encode(encoder, images, batch_size=batch_size), one_by_one)


# ------------------------------------------------------------------ the task and bad inputs


def test_shapes_task_is_deterministic_and_answers_match_the_scene(tmp_path):
    a = shapes.generate(tmp_path / "a", "train", 24, seed=3, image_size=64, max_objects=4)
    b = shapes.generate(tmp_path / "b", "train", 24, seed=3, image_size=64, max_objects=4)
    assert a == b
    assert (tmp_path / "a" / a[5].image).read_bytes() == (tmp_path / "b" / b[5].image).read_bytes()
    assert {e.kind for e in a} == set(shapes.KINDS)
    for e in a:
        described = e.caption.split(", ")
        if e.kind == "count":
            noun = e.question.split()[2][:-1]  # "how many circles are there?"
            assert int(e.answer) == sum(d.endswith(noun) for d in described)
        if e.kind == "colour":
            noun = e.question.split()[-1][:-1]
            assert f"a {e.answer} {noun}" in described


def test_bad_images_each_get_a_clear_error(tmp_path):
    from PIL import Image

    with pytest.raises(MissingInputError, match="image not found"):
        shapes.load_image(tmp_path / "missing.png", 64)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(DataError, match="not a readable image"):
        shapes.load_image(tmp_path / "text.png", 64)
    Image.new("RGB", (20, 80)).save(tmp_path / "small.png")
    with pytest.raises(DataError, match="at least 32 px"):
        shapes.load_image(tmp_path / "small.png", 64)
    # documented conversions: other modes and sizes are converted, transparency lands on white
    Image.new("RGBA", (100, 50), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    Image.new("L", (40, 40), 0).save(tmp_path / "grey.png")
    clear, grey = shapes.load_image(tmp_path / "clear.png", 64), shapes.load_image(tmp_path / "grey.png", 64)
    assert clear.shape == grey.shape == (3, 64, 64)
    assert clear.min() == 1.0 and grey.max() == 0.0


def test_user_jsonl_names_file_and_line(tmp_path):
    from PIL import Image

    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    good = {"image": "a.png", "question": "what is it?", "answer": "black"}
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "image": "b.png"}) + "\n")
    with pytest.raises(MissingInputError, match=r"data.jsonl:2: image 'b.png' not found"):
        shapes.load_examples(path)
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "answer": 3}) + "\n")
    with pytest.raises(DataError, match=r"data.jsonl:2: field 'answer' must be a non-empty string"):
        shapes.load_examples(path)
    path.write_text(json.dumps(good) + "\n")
    assert shapes.load_examples(path)[0].image == str(tmp_path / "a.png")


def test_a_question_longer_than_the_context_is_an_error(tokenizer):
    bridge = palme(tokenizer)
    bridge.lm.config.max_position_embeddings = 64
    fmt = PromptFormat(tokenizer)
    check_fits(bridge, fmt.row(f"{shapes.IMAGE_MARKER} how many?", [image(0)]))
    long = fmt.row(f"{shapes.IMAGE_MARKER} " + "why " * 200, [image(0)])
    with pytest.raises(DataError, match="longer than the LM's context of 64 tokens"):
        check_fits(bridge, long)
    with pytest.raises(DataError, match="1 <image> markers but 2 images"):
        fmt.row(f"{shapes.IMAGE_MARKER} two?", [image(0), image(1)])


def test_bare_lm_reads_the_text_only(tokenizer):
    lm = tiny_lm(tokenizer)
    fmt = PromptFormat(tokenizer)
    row = fmt.row("what colour is the triangle?", [])
    ids = torch.tensor([[t for p in row.pieces for t in p]])
    with torch.no_grad():
        assert torch.equal(BareLM(lm, tokenizer.pad_token_id).forward_rows([row]), lm(input_ids=ids).logits)


def test_the_weights_wheel_is_installed():  # make setup installs it (--no-deps)
    assert vision.bundled_weights_path().is_file()


def test_multimodal_cli_rejects_bad_images(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "mm"
    out.mkdir()
    (out / "multimodal.json").write_text(json.dumps({"image_size": 64, "methods": ["flamingo"]}))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    cli = [str(Path(sys.executable).parent / "posttrain"), "mm", "ask"]
    proc = subprocess.run(
        [*cli, str(tmp_path / "bad.png"), "what?", "--dir", str(out)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"posttrain mm ask: error: {tmp_path / 'bad.png'}: not a readable image "
        f"(UnidentifiedImageError: cannot identify image file '{tmp_path / 'bad.png'}')"
    ]
    proc = subprocess.run(
        [*cli, str(tmp_path / "bad.png"), "what?", "--dir", str(tmp_path)], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "no trained multimodal bridge here" in proc.stderr


def test_disabled_stage_writes_an_empty_described_output(tmp_path):
    from dataclasses import replace as dc_replace

    from components.params import Params
    from components.tracking import RecordingTracker
    from tasks.multimodal import run

    params = Params()
    paths = dc_replace(params.paths, multimodal=str(tmp_path / "mm"), plots=str(tmp_path / "plots"))
    params = dc_replace(params, paths=paths, multimodal=dc_replace(params.multimodal, enabled=False))
    assert run(params, RecordingTracker()) == {"enabled": False}
    assert (tmp_path / "mm/config.yaml").is_file()
    assert (tmp_path / "plots/multimodal_gates.png").is_file()
    assert (tmp_path / "plots/multimodal_loss.csv").read_text() == "step,bridge,loss\n"
