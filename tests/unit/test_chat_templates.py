"""Assistant-only loss for any chat template: the SFT mask is exactly the reply + its end-of-turn token."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerBase

from components.errors import PosttrainError
from components.models import tiny
from components.training.sft import ChatTemplateError, completion_example, stop_token_ids

# SmolLM2-135M-Instruct's template as the bundled GGUF carries it (ChatML with a default system turn,
# no {% generation %} markers: TRL's assistant_only_loss rejects it).
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)
CHAT = [{"role": "user", "content": "What is 12 plus 30?"}, {"role": "assistant", "content": "42"}]


LINES = [f"What is {i} plus {i}? {2 * i} reverse upper" for i in range(100)]


def _chatml(template: str = SMOLLM2_TEMPLATE) -> PreTrainedTokenizerBase:
    """A small BPE tokenizer with ChatML's special tokens (eos = <|im_end|>) and ``template``."""
    tok = tiny.build_tokenizer(LINES, 300)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = tok.pad_token = "<|im_end|>"
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def tiny_tok() -> PreTrainedTokenizerBase:
    return tiny.build_tokenizer(LINES, 300)


@pytest.fixture(scope="module")
def chatml_tok() -> PreTrainedTokenizerBase:
    return _chatml()


def _marked(tok: PreTrainedTokenizerBase, messages: list[dict]) -> str:
    ex = completion_example(tok, messages, {tok.eos_token_id}, "m")
    assert len(ex["input_ids"]) == len(ex["completion_mask"])
    return tok.decode([t for t, m in zip(ex["input_ids"], ex["completion_mask"], strict=True) if m])


def test_tiny_template_mask_equals_its_generation_marks(tiny_tok: PreTrainedTokenizerBase) -> None:
    """Same labels as TRL's assistant_only_loss on the {% generation %} template: tiny SFT is unchanged."""
    ex = completion_example(tiny_tok, CHAT, {tiny_tok.eos_token_id})
    enc = tiny_tok.apply_chat_template(
        CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert ex["input_ids"] == list(enc["input_ids"])
    assert ex["completion_mask"] == list(enc["assistant_masks"])
    assert _marked(tiny_tok, CHAT) == "42<|end|>"


def test_chatml_template_masks_reply_and_im_end_but_not_the_newline(
    chatml_tok: PreTrainedTokenizerBase,
) -> None:
    text = chatml_tok.apply_chat_template(CHAT, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n42<|im_end|>\n")
    assert _marked(chatml_tok, CHAT) == "42<|im_end|>"
    ex = completion_example(chatml_tok, CHAT, {chatml_tok.eos_token_id})
    assert ex["completion_mask"][-1] == 0 and chatml_tok.decode(ex["input_ids"][-1:]) == "\n"


def test_only_the_last_assistant_turn_is_the_completion(chatml_tok: PreTrainedTokenizerBase) -> None:
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 1 plus 1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "What is 2 plus 2?"},
        {"role": "assistant", "content": "4"},
    ]
    assert _marked(chatml_tok, chat) == "4<|im_end|>"


def test_trl_rejects_the_smollm2_template_for_assistant_only_loss(
    chatml_tok: PreTrainedTokenizerBase,
) -> None:
    """Why sft.py builds the completion mask itself instead of TRL's assistant_only_loss."""
    from trl.chat_template_utils import get_training_chat_template

    with pytest.raises(ValueError, match="not training-compatible"):
        get_training_chat_template(chatml_tok)


def test_a_template_that_is_not_prefix_preserving_fails_in_one_line() -> None:
    # Renders the last turn differently: the prompt alone is no prefix of prompt + reply.
    tok = _chatml(
        "{% for m in messages %}{% if loop.last %}<|im_start|>{{ m['role'] }}!{{ m['content'] }}<|im_end|>"
        "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(ChatTemplateError, match=r"^base\.model 'some/model': .*prefix.*fix: ") as err:
        completion_example(tok, CHAT, {tok.eos_token_id}, "some/model")
    assert isinstance(err.value, PosttrainError) and "\n" not in str(err.value)


def test_a_reply_without_an_end_of_turn_token_fails_in_one_line() -> None:
    tok = _chatml(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(ChatTemplateError, match=r"^base\.model: .*eos.*fix: "):
        completion_example(tok, CHAT, {tok.eos_token_id})


def test_stop_ids_include_generation_config_eos(chatml_tok: PreTrainedTokenizerBase) -> None:
    class _Model:
        class generation_config:  # noqa: N801 - stands in for a model's attribute
            eos_token_id = [7, 8]

    assert stop_token_ids(chatml_tok, _Model()) == {chatml_tok.eos_token_id, 7, 8}
