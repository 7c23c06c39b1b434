"""The BOS rule (PROTOCOL §8 tokenisation): release adds the tokenizer's BOS even where the rendered
prompt already starts with one; corrected adds it only where missing."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from t2eval.errors import T2EvalError
from t2eval.tokens import bos_mode, prompt_ids


@pytest.fixture(scope="module")
def llama_like():
    """A word-level tokenizer whose default call prepends <bos> (like Llama-3's)."""
    vocab = {"<bos>": 0, "<eos>": 1, "hello": 2, "world": 3, "[UNK]": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="[UNK]")


def test_double_bos_on_a_prompt_that_starts_with_bos(llama_like):
    assert prompt_ids(llama_like, "<bos> hello world", "double") == [0, 0, 2, 3]
    assert prompt_ids(llama_like, "<bos> hello world", "single") == [0, 2, 3]


def test_one_bos_on_a_prompt_without_it(llama_like):
    assert prompt_ids(llama_like, "hello world", "double") == [0, 2, 3]
    assert prompt_ids(llama_like, "hello world", "single") == [0, 2, 3]


def test_bad_mode_and_protocol_knob(llama_like):
    with pytest.raises(T2EvalError, match="bos='triple'"):
        prompt_ids(llama_like, "hello", "triple")
    assert bos_mode("release") == "double" and bos_mode("corrected") == "single"
