"""First-pass dispatch: question extraction, category parsing, generate vs logprob modes."""

from __future__ import annotations

import os

import pytest

from t2eval.adapt import dispatch as dsp

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from t2eval.testing import tiny_model_dir

    return AutoTokenizer.from_pretrained(tiny_model_dir(0))


def test_expert_mapping_and_parse():
    assert [dsp.expert_for(c) for c in ("code", "math", "reasoning", "other", "junk")] == \
        ["code", "math", "reasoning", None, None]
    assert dsp.parse_category("Classification: \\boxed{math}") == "math"
    assert dsp.parse_category("I think \\boxed{poetry}") == "other"
    assert dsp.parse_category("no box at all") == "other"
    assert set(dsp.categories()) == {"code", "math", "reasoning", "other"}


def test_user_text_recovers_last_user_turn(tok):
    q = "What is 2 + 2?\nOptions:\nA. 3\nB. 4"
    rendered = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "earlier question"},
                                        {"role": "assistant", "content": "ok"},
                                        {"role": "user", "content": q}], tokenize=False,
                                       add_generation_prompt=True) + "Let's think"
    assert dsp.user_text(tok, rendered) == q
    assert dsp.user_text(tok, "plain text, no template") == "plain text, no template"


def test_question_of_t2_task_uses_the_task_user_message(tok):
    doc = {"question": "Which is a mammal?", "choices": {"text": ["cat", "fish"], "label": ["A", "B"]},
           "answerKey": "A"}
    from t2eval.tasks import get_task

    want = get_task("arc_challenge").user_message(doc)
    assert dsp.question_of(tok, "t2_arc_challenge_fewshot_test", doc, "ignored") == want
    assert dsp.question_of(tok, "arc_challenge", doc, "raw ctx") == "raw ctx"  # stock task: from the context


def test_prompt_contains_question_and_boxed_instruction(tok):
    p = dsp.classification_prompt(tok, "Write a function that adds two numbers.")
    assert "Write a function that adds two numbers." in p and "\\boxed{" in p
    assert p.rstrip().endswith("assistant")  # generation prompt added


def test_generate_and_logprob_modes_on_tiny_model(tok):
    from t2eval.lm import T2LM
    from t2eval.testing import tiny_model_dir

    lm = T2LM(pretrained=str(tiny_model_dir(0)), batch_size=4)
    qs = ["What is 3 + 5?", "Write a Python function to reverse a list.", "Why do leaves change colour?"]
    g = dsp.dispatch_generate(qs, tok, lm._t2_generate, max_new_tokens=6)
    assert len(g.categories) == 3 and all(c in dsp.categories() for c in g.categories)
    assert g.tokens > 0 and g.prompt_tokens > 0 and len(g.raw) == 3
    lp = dsp.dispatch_logprob(qs, tok, lm._t2_score)
    assert all(c in dsp.categories() for c in lp.categories)
    # logprob picks the arg-max label: re-score by hand for the first question
    labels = dsp.categories()
    scores = lm._t2_score([(dsp.classification_prompt(tok, qs[0]) + dsp.ANSWER_PREFIX, lab + "}") for lab in labels])
    assert lp.categories[0] == labels[max(range(len(labels)), key=lambda j: scores[j])]
    assert lp.experts == [dsp.expert_for(c) for c in lp.categories]


def test_logprob_fast_path_is_one_batched_forward_and_matches_single_prompts(tok):
    import torch

    from t2eval.lm import T2LM
    from t2eval.testing import tiny_model_dir

    lm = T2LM(pretrained=str(tiny_model_dir(0)), batch_size=4)
    qs = ["What is 3 + 5?", "Write a Python function to reverse a list of integers in place.", "Why is the sky blue?"]
    prompts = [dsp.classification_prompt(tok, q) + dsp.ANSWER_PREFIX for q in qs]
    firsts = dsp.label_first_tokens(tok, prompts[0], dsp.categories())
    assert firsts is not None and len(set(firsts)) == 4  # SmolLM2's tokenizer: the first token decides
    batched = lm._t2_next_token_logprobs(prompts)  # prompts of different lengths: left padding
    for p, row in zip(prompts, batched):
        ids = tok(p, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            ref = torch.log_softmax(lm.model(ids).logits[0, -1].float(), -1)
        assert torch.allclose(row, ref, atol=1e-4)
    fast = dsp.dispatch_logprob(qs, tok, lm._t2_score, lm._t2_next_token_logprobs)
    for row, cat in zip(batched, fast.categories):
        assert cat == dsp.categories()[max(range(4), key=lambda j: (float(row[firsts[j]]), -j))]
    # the first token's log-prob is the first term of the full label score
    full = lm._t2_score([(prompts[0], tok.decode([firsts[0]]))])[0]
    assert abs(full - float(batched[0][firsts[0]])) < 1e-3


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_shared_prefix_logprobs_equal_plain_forwards(tok, batch_size):
    """The prefix-cached path (shared system prompt encoded once) gives every prompt's own next-token
    distribution, whatever the micro-batching; prompts without a shared prefix take the plain path;
    a prompt that is a prefix of another still keeps one token of its own."""
    import torch

    from t2eval.adapt.prefix_logprobs import common_prefix_len, next_token_logprobs
    from t2eval.models.loading import load_model
    from t2eval.testing import tiny_model_dir

    model = load_model(str(tiny_model_dir(0)), dtype="float32")
    base = dsp.classification_prompt(tok, "Q")
    shared = [dsp.classification_prompt(tok, q) + dsp.ANSWER_PREFIX for q in
              ("What is 3 + 5?", "Reverse a list in Python, in place, without slicing.", "Why?", "Name a prime.")]
    shared.append(shared[2][:-3])  # a strict prefix of another prompt
    unrelated = ["Hello there", "A completely different opening", "x"]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in shared]
    assert common_prefix_len(ids) >= 16 and common_prefix_len([[1, 2, 3], [1, 2, 4]]) == 2
    for prompts in (shared, unrelated):
        rows = next_token_logprobs(model, tok, prompts, batch_size=batch_size)
        assert len(rows) == len(prompts)
        for p, row in zip(prompts, rows):
            x = tok(p, return_tensors="pt", add_special_tokens=False).input_ids
            with torch.no_grad():
                ref = torch.log_softmax(model(x).logits[0, -1].float(), -1)
            assert torch.allclose(row, ref, atol=1e-4), (p[-40:], (row - ref).abs().max())
    assert len(tok(base, add_special_tokens=False)["input_ids"]) > 16
