"""Test helper: the embedded tokenizer with every built-in template's special tokens (and the tool-calling
ones of the official templates), and each family's bos/eos, so the official templates in
tests/assets/templates/ render as they do with the real tokenizer.
Nothing is downloaded: the tokens are added to a copy of the embedded tokenizer."""

from __future__ import annotations

import copy
from pathlib import Path

from distsft.data.templates import BUILTIN

TEMPLATES = Path(__file__).resolve().parent / "assets" / "templates"

# built-in -> (bos, eos) its official template reads from the tokenizer (None: the embedded tokenizer's)
BOS_EOS = {
    "chatml": (None, None),
    "llama3": ("<|begin_of_text|>", "<|eot_id|>"),
    "llama3.1": ("<|begin_of_text|>", "<|eot_id|>"),
    "qwen2.5": (None, "<|im_end|>"),
    "qwen3": (None, "<|im_end|>"),
    "qwen3_nothink": (None, "<|im_end|>"),
    "gemma": ("<bos>", "<eos>"),
    "mistral_v7": ("<s>", "</s>"),
    "phi3": (None, "<|endoftext|>"),
    "mistral_nemo": ("<s>", "</s>"),  # tests/assets/templates/mistral_nemo.jinja (no built-in): tool calls
}
# the tool-calling tokens of the official templates: special ones, and Qwen's ordinary added ones
TOOL_TOKENS = ("[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]",
               "<|python_tag|>", "<|eom_id|>")
QWEN_TOOL_TOKENS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")


def all_tokens() -> list[str]:
    return sorted({m for b in BUILTIN.values() for m in b.markers} | {"<eos>", *TOOL_TOKENS})


def family_tokenizer(base, name: str):
    """A copy of ``base`` with every built-in's tokens, and the bos/eos of built-in ``name``'s family."""
    tok = copy.deepcopy(base)
    vocab = tok.get_vocab()
    special = [t for t in all_tokens() if t not in vocab and t not in ("<think>", "</think>")]
    tok.add_tokens(special, special_tokens=True)
    tok.add_tokens([t for t in ("<think>", "</think>", *QWEN_TOOL_TOKENS) if t not in vocab])  # ordinary, as in Qwen
    bos, eos = BOS_EOS[name]
    if bos:
        tok.bos_token = bos
    if eos:
        tok.eos_token = eos
    return tok


def official(filename: str) -> str:
    return (TEMPLATES / filename).read_text()
