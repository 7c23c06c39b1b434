"""How a rendered prompt becomes token ids: the one place that decides about the BOS token.

PROTOCOL §8 "Tokenisation": the release tokenises every rendered prompt with the tokenizer's default
(`add_special_tokens=True`), so a prompt whose chat template already starts with the BOS token
(Llama-3: "<|begin_of_text|>") gets a second one, and a prompt without it (the code template) gets
one. `bos="double"` (protocol `release`) reproduces that; `bos="single"` (protocol `corrected`) adds a
BOS only where the text does not already start with it. Tokenizers without a BOS token (SmolLM2) are
unaffected by either.

Generation, the PG loss and CEM scoring call `prompt_ids`; `bos_mode(protocol)` reads the knob.
"""

from __future__ import annotations

from typing import Any

from .errors import T2EvalError

BOS_MODES = ("double", "single")


def bos_mode(protocol: str | None = None, overrides: dict[str, Any] | None = None) -> str:
    from .protocol import value

    return value("bos", protocol, overrides)


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer's default call prepends its BOS token."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def prompt_ids(tokenizer, text: str, bos: str = "double") -> list[int]:
    """Token ids of a fully rendered prompt (chat template + pre-fill already applied)."""
    if bos not in BOS_MODES:
        raise T2EvalError(f"bos={bos!r}: use double (the release) or single (corrected)")
    if bos == "double":
        return list(tokenizer(text, add_special_tokens=True)["input_ids"])
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    b = getattr(tokenizer, "bos_token_id", None)
    if b is not None and _adds_bos(tokenizer) and (not ids or ids[0] != b):
        ids = [b] + ids
    return ids
