"""Text and chat: `Model.encode/chat_ids/decode`, the generate command's prompt records (`cli.generate.prompt_ids`)
and training's chat labels (`train.data.chat_sequence`), on a word-level tokenizer built in memory with a chat
template (no assets), against token ids written out by hand. With SmolLM2's real tokenizer and template through
the CLI: tests/integration/test_cli.py."""
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from helpers import tiny_config
from lt_jax.api import Model
from lt_jax.cli.generate import prompt_ids
from lt_jax.errors import LtJaxError
from lt_jax.params import empty_params
from lt_jax.train.data import chat_sequence
from lt_jax.train.step import IGNORE

WORDS = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>", "hi", "there", "sea", "tell", "me", "ok"]
ID = {w: i for i, w in enumerate(WORDS)}
TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|> {{ m.content }} <|end|> {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def tokenizer(template=TEMPLATE):
    tok = Tokenizer(models.WordLevel(ID, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   additional_special_tokens=["<|user|>", "<|assistant|>", "<|end|>"])
    fast.chat_template = template
    return fast


def model(tok):
    cfg = tiny_config(num_layers=1, vocab_size=len(WORDS))
    return Model(cfg, empty_params(cfg), tokenizer=tok, path=Path("tiny"))


def ids(text):
    return [ID[w] for w in text.split()]


def test_encode_chat_ids_and_decode():
    m = model(tokenizer())
    assert m.encode("tell me") == ids("tell me")
    assert m.chat_ids("tell me") == ids("<|user|> tell me <|end|> <|assistant|>")  # the generation prompt
    assert m.decode(ids("<|assistant|> hi there </s>")) == "hi there"  # special tokens dropped


@pytest.mark.parametrize("tok, call, words", [
    (None, lambda m: m.encode("hi"), "model tiny has no tokenizer files; pass token ids instead of text"),
    (None, lambda m: m.decode([1]), "model tiny has no tokenizer files; cannot decode"),
    (None, lambda m: m.chat_ids("hi"), "model tiny has no chat template"),
    (tokenizer(template=None), lambda m: m.chat_ids("hi"), "model tiny has no chat template"),
    (tokenizer(), lambda m: m.encode(["hi"]), "encode takes a str; got list"),
])
def test_refusals(tok, call, words):
    with pytest.raises(LtJaxError) as e:
        call(model(tok))
    assert words in str(e.value), str(e.value)


def test_prompt_records():
    m = model(tokenizer())
    assert prompt_ids(m, {"kind": "ids", "value": [3, 4]}, chat=True) == [3, 4]
    assert prompt_ids(m, {"kind": "prompt", "value": "hi"}, chat=False) == ids("hi")
    assert prompt_ids(m, {"kind": "prompt", "value": "hi"}, chat=True) == m.chat_ids("hi")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "sea"}]
    assert prompt_ids(m, {"kind": "messages", "value": messages}, chat=False) == ids(
        "<|user|> hi <|end|> <|assistant|> ok <|end|> <|user|> sea <|end|> <|assistant|>")
    with pytest.raises(LtJaxError, match="model tiny has no chat template for messages"):
        prompt_ids(model(tokenizer(template=None)), {"kind": "messages", "value": messages}, chat=False)


def test_chat_labels_only_the_assistant_turns():
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hi there"},
                {"role": "user", "content": "tell me"}, {"role": "assistant", "content": "ok"}]
    got, labels = chat_sequence(model(tokenizer()), messages)
    assert got == ids("<|user|> hi <|end|> <|assistant|> hi there <|end|> <|user|> tell me <|end|> "
                      "<|assistant|> ok <|end|>")
    learned = [t if lab != IGNORE else None for t, lab in zip(got, labels)]
    assert learned == [None] * 4 + ids("hi there <|end|>") + [None] * 5 + ids("ok <|end|>")
    assert all(lab in (IGNORE, t) for t, lab in zip(got, labels))


def test_chat_labels_refuse_a_template_that_is_not_a_prefix():
    growing = "{{ '<s> ' * (messages | length) }}" + TEMPLATE  # one more <s> in front per turn
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(ValueError, match="does not render turn by turn as a prefix"):
        chat_sequence(model(tokenizer(template=growing)), messages)
    with pytest.raises(LtJaxError, match="need a tokenizer with a chat template"):
        chat_sequence(model(tokenizer(template=None)), messages)
