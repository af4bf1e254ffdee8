"""Knowledge distillation into a smaller student: the student's config, the layer map, initialising
from the teacher (exact copies, top MLP channels), the KD + masked-CE loss, held-out KL dropping,
determinism and sizes (tiny Llama, CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from components.compression.distill import (
    distill,
    init_student,
    param_bytes,
    select_layers,
    student_config,
)
from components.compression.quantize import mean_token_kl

VOCAB = 64
ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _teacher(tie: bool, seed: int = 0, initializer_range: float = 0.1) -> LlamaForCausalLM:
    """4 layers, hidden 32, MLP 64; a wider init than Llama's 0.02 so its distributions aren't ~uniform."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        initializer_range=initializer_range,
    )
    return LlamaForCausalLM(config).eval()


def _sequences(n: int, seed: int, base_length: int = 12) -> list[list[int]]:
    """Uniform random tokens of lengths base_length .. base_length + 4, so batches need padding."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (base_length + i % 5,), generator=g).tolist() for i in range(n)]


def _layer(model: LlamaForCausalLM, index: int, name: str) -> torch.Tensor:
    return model.model.layers[index].get_submodule(name).weight


@torch.no_grad()
def _padded_logits(model: LlamaForCausalLM, seqs: list[list[int]]) -> torch.Tensor:
    length = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (length - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (length - len(s)) for s in seqs])
    return model(input_ids=ids, attention_mask=mask).logits


# ----------------------------------------------------------------- config and layer map


def test_student_config_cuts_layers_and_width_and_leaves_the_rest() -> None:
    teacher_config = _teacher(tie=True).config
    config = student_config(teacher_config, num_layers=2, intermediate_size=32)
    assert (config.num_hidden_layers, config.intermediate_size) == (2, 32)
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (32, 4, 2)
    assert (config.vocab_size, config.tie_word_embeddings) == (VOCAB, True)
    assert (teacher_config.num_hidden_layers, teacher_config.intermediate_size) == (4, 64)  # a copy
    same = student_config(teacher_config, None, None)
    assert (same.num_hidden_layers, same.intermediate_size) == (4, 64)
    assert student_config(teacher_config, 4, 64).to_dict() == teacher_config.to_dict()


@pytest.mark.parametrize(
    ("num_layers", "intermediate_size", "key"),
    [
        (0, None, "compress.distill.num_layers"),
        (5, None, "compress.distill.num_layers"),
        (2.0, None, "compress.distill.num_layers"),
        (None, 0, "compress.distill.intermediate_size"),
        (None, 65, "compress.distill.intermediate_size"),
    ],
)
def test_student_config_rejects_out_of_range_values(num_layers, intermediate_size, key) -> None:
    with pytest.raises(ValueError, match=key):
        student_config(_teacher(tie=True).config, num_layers, intermediate_size)


def test_init_student_rejects_a_wider_or_deeper_config() -> None:
    teacher = _teacher(tie=True)
    wide = copy.deepcopy(teacher.config)
    wide.intermediate_size = 128
    with pytest.raises(ValueError, match="compress.distill.intermediate_size"):
        init_student(teacher, wide)
    deep = copy.deepcopy(teacher.config)
    deep.num_hidden_layers = 5
    with pytest.raises(ValueError, match="compress.distill.num_layers"):
        init_student(teacher, deep)


def test_uniform_layer_map_takes_first_last_and_evenly_spaced_layers() -> None:
    # Hand-computed: round-half-up of i * (L - 1) / (n - 1).
    assert select_layers(4, 2) == [0, 3]
    assert select_layers(4, 3) == [0, 2, 3]  # 0, 1.5, 3
    assert select_layers(6, 3) == [0, 3, 5]  # 0, 2.5, 5
    assert select_layers(12, 4) == [0, 4, 7, 11]  # 0, 3.67, 7.33, 11
    assert select_layers(4, 4) == [0, 1, 2, 3]
    assert select_layers(4, 1) == [0]
    assert select_layers(4, 2, "first") == [0, 1]
    with pytest.raises(ValueError, match="compress.distill.layer_map"):
        select_layers(4, 2, "random")


# ----------------------------------------------------------------- initialisation


@pytest.mark.parametrize("tie", [True, False])
def test_init_student_copies_mapped_layers_embeddings_and_head(tie: bool) -> None:
    teacher = _teacher(tie)
    student, layers = init_student(teacher, student_config(teacher.config, 2, None))
    assert layers == [0, 3]
    assert len(student.model.layers) == 2
    for i, j in enumerate(layers):
        for name in ATTENTION + NORMS + MLP:
            assert torch.equal(_layer(student, i, name), _layer(teacher, j, name)), (i, name)
    assert not torch.equal(_layer(student, 1, "self_attn.q_proj"), _layer(teacher, 1, "self_attn.q_proj"))
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight)
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    assert (student.lm_head.weight is student.model.embed_tokens.weight) is tie
    assert type(student) is LlamaForCausalLM and not student.training


@pytest.mark.parametrize("tie", [True, False])
def test_full_size_student_reproduces_the_teachers_logits_exactly(tie: bool) -> None:
    teacher = _teacher(tie)
    student, layers = init_student(teacher, student_config(teacher.config, None, None))
    assert layers == [0, 1, 2, 3]
    seqs = _sequences(4, seed=5)
    assert torch.equal(_padded_logits(student, seqs), _padded_logits(teacher, seqs))


@torch.no_grad()
def test_narrow_mlp_keeps_the_important_channels_with_gate_up_and_down_aligned() -> None:
    """Only 8 channels per layer matter (the others' down columns are zero): a width-8 student
    must keep exactly those, rows of gate/up and columns of down alike, and so match the teacher."""
    teacher = _teacher(tie=False)
    g = torch.Generator().manual_seed(3)
    kept = []
    for layer in teacher.model.layers:
        channels = torch.randperm(64, generator=g)[:8].sort().values
        dead = torch.ones(64, dtype=torch.bool)
        dead[channels] = False
        layer.mlp.down_proj.weight[:, dead] = 0.0
        kept.append(channels)

    full_depth, _ = init_student(teacher, student_config(teacher.config, None, 8))
    seqs = _sequences(4, seed=6)
    torch.testing.assert_close(_padded_logits(full_depth, seqs), _padded_logits(teacher, seqs))

    student, layers = init_student(teacher, student_config(teacher.config, 2, 8))
    for i, j in enumerate(layers):
        s_mlp, t_mlp = student.model.layers[i].mlp, teacher.model.layers[j].mlp
        assert torch.equal(s_mlp.gate_proj.weight, t_mlp.gate_proj.weight[kept[j]])
        assert torch.equal(s_mlp.up_proj.weight, t_mlp.up_proj.weight[kept[j]])
        assert torch.equal(s_mlp.down_proj.weight, t_mlp.down_proj.weight[:, kept[j]])
        for name in ATTENTION + NORMS:
            assert torch.equal(_layer(student, i, name), _layer(teacher, j, name))


# ----------------------------------------------------------------- the loss


@torch.no_grad()
def _hand_losses(student, teacher, seqs, masks, temperature):
    """(T² · mean KL over all tokens, mean CE over tokens t >= 1 with mask[t] == 1), one
    unpadded sequence at a time."""
    kl_sum, n_tokens, nll_sum, n_targets = 0.0, 0, 0.0, 0
    for seq, mask in zip(seqs, masks, strict=True):
        ids = torch.tensor([seq])
        z_s, z_t = student(input_ids=ids).logits[0], teacher(input_ids=ids).logits[0]
        log_t, log_s = F.log_softmax(z_t / temperature, -1), F.log_softmax(z_s / temperature, -1)
        kl_sum += (log_t.exp() * (log_t - log_s)).sum().item()
        n_tokens += len(seq)
        nll = F.cross_entropy(z_s[:-1], ids[0, 1:], reduction="none")
        keep = torch.tensor(mask[1:]).bool()
        nll_sum += nll[keep].sum().item()
        n_targets += int(keep.sum())
    return temperature**2 * kl_sum / n_tokens, nll_sum / n_targets


def test_loss_is_t2_scaled_kl_plus_ce_on_loss_mask_positions_only() -> None:
    teacher = _teacher(tie=True)
    seqs = _sequences(3, seed=7, base_length=6)  # lengths 6, 7, 8: padded in one batch
    masks = [[0] * 3 + [1] * (len(s) - 3) for s in seqs]  # a 3-token "prompt" out of the CE
    all_tokens = [[1] * len(s) for s in seqs]
    runs = {}
    for label, loss_mask in (("masked", masks), ("unmasked", None)):
        student, _ = init_student(teacher, student_config(teacher.config, 2, 32))
        kd, ce = _hand_losses(student, teacher, seqs, masks if loss_mask else all_tokens, 3.0)
        history = distill(
            student, teacher, seqs, loss_mask, steps=1, learning_rate=1e-3, batch_size=3,
            temperature=3.0, alpha_kd=2.0, alpha_ce=0.5,
        )  # fmt: skip
        row = history[0]
        assert row["kd"] == pytest.approx(kd, rel=1e-4)
        assert row["ce"] == pytest.approx(ce, rel=1e-4)
        assert row["loss"] == pytest.approx(2.0 * row["kd"] + 0.5 * row["ce"], rel=1e-6)
        runs[label] = row["ce"]
    assert abs(runs["masked"] - runs["unmasked"]) > 1e-3


def test_distill_rejects_bad_arguments() -> None:
    teacher = _teacher(tie=True)
    student, _ = init_student(teacher, student_config(teacher.config, 2, None))
    seqs = _sequences(2, seed=8)
    with pytest.raises(ValueError, match="compress.distill.temperature"):
        distill(student, teacher, seqs, None, steps=1, learning_rate=1e-3, temperature=0.0)
    with pytest.raises(ValueError, match="loss_mask"):
        distill(student, teacher, seqs, [[1] * 3, [1] * 3], steps=1, learning_rate=1e-3)
    with pytest.raises(ValueError, match="alpha_kd"):
        distill(student, teacher, seqs, None, steps=1, learning_rate=1e-3, alpha_kd=0.0, alpha_ce=0.0)


# ----------------------------------------------------------------- training


@pytest.mark.parametrize("tie", [True, False])
def test_distillation_lowers_held_out_kl_and_trains_only_the_student(tie: bool) -> None:
    teacher = _teacher(tie)
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    student, _ = init_student(teacher, student_config(teacher.config, 2, 32))
    start = {k: v.clone() for k, v in student.named_parameters()}
    train, held_out = _sequences(128, seed=1), _sequences(16, seed=2)
    before = mean_token_kl(teacher, student, held_out)
    history = distill(student, teacher, train, None, steps=100, learning_rate=3e-3, batch_size=8)
    after = mean_token_kl(teacher, student, held_out)
    # Measured: 0.217 -> 0.060 nats/token (tied), 0.201 -> 0.059 (untied) on held-out sequences.
    assert before > 0.05
    assert after < 0.7 * before, (before, after)
    assert [row["step"] for row in history] == list(range(100))
    assert history[-1]["kd"] < history[0]["kd"]
    assert all(not torch.equal(p, start[n]) for n, p in student.named_parameters())  # every weight trains
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())
    assert (student.lm_head.weight is student.model.embed_tokens.weight) is tie


def test_same_seed_same_history_and_weights() -> None:
    teacher = _teacher(tie=True)
    seqs = _sequences(16, seed=9)
    runs = []
    for seed in (0, 0, 1):
        student, _ = init_student(teacher, student_config(teacher.config, 2, 32))
        history = distill(student, teacher, seqs, None, steps=6, learning_rate=1e-3, batch_size=4, seed=seed)
        runs.append((history, student.state_dict()))
    (h0, s0), (h1, s1), (h2, _) = runs
    assert h0 == h1
    assert all(torch.equal(s0[k], s1[k]) for k in s0)
    assert h0 != h2  # the seed really picks the batches


# ----------------------------------------------------------------- size


def test_param_bytes_counts_tied_weights_once() -> None:
    # Per teacher layer: q, o 32x32; k, v 32x16 (2 kv heads of 8); gate, up 64x32; down 32x64;
    # two norms of 32 -> 9280 values. Plus embeddings 64x32 and the final norm 32.
    tied, untied = _teacher(tie=True), _teacher(tie=False)
    assert param_bytes(tied) == 4 * (4 * 9280 + 2048 + 32) == 156_800
    assert param_bytes(untied) == 156_800 + 4 * 2048
    assert param_bytes(tied.half()) == 156_800 // 2
    student, _ = init_student(_teacher(tie=True), student_config(tied.config, 2, 32))
    # Per student layer: attention 3072 + MLP 3 * 32x32 + norms 64 = 6208.
    assert param_bytes(student) == 4 * (2 * 6208 + 2048 + 32) == 57_984
