"""Every built-in template renders exactly what its family's official template renders (verbatim copies
in tests/assets/templates/, see its README), through transformers' apply_chat_template: each training
example (a conversation ending in a reply) and each generation prompt. A deliberately different
template is told apart (negative control)."""

from __future__ import annotations

import pytest

from distsft.data.sources import DataError
from distsft.data.templates import BUILTIN, CHATML, end_of_turn_id, resolve_template
from tests.chat_families import family_tokenizer, official

SYS = {"role": "system", "content": "You are terse."}
U1, A1 = {"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "2 plus 2 is 4."}
U2, A2 = {"role": "user", "content": "Spell apple backwards."}, {"role": "assistant", "content": "elppa"}
U3, A3 = {"role": "user", "content": "  spaced\n"}, {"role": "assistant", "content": "\n  trimmed?  \n"}
THINK1 = {"role": "assistant", "content": "<think>\nAdd 2 and 2.\n</think>\n\n2 plus 2 is 4."}
THINK2 = {"role": "assistant", "content": "<think>reverse the letters</think>elppa"}
CONVERSATIONS = {
    "single": [U1, A1],
    "system": [SYS, U1, A1],
    "multi": [SYS, U1, A1, U2, A2],
    "multi_no_system": [U1, A1, U2, A2, U3, A3],
    "whitespace": [SYS, U3, A3],
    "reasoning": [SYS, U1, THINK1, U2, THINK2],
    "empty_system": [{"role": "system", "content": ""}, U1, A1],
}

# built-in -> [(official file, apply_chat_template kwargs given to both, conversations it must equal it on)]
ALL = list(CONVERSATIONS)
NO_SYSTEM = [k for k, c in CONVERSATIONS.items() if c[0]["role"] != "system"]
CASES = {
    "llama3": [("llama3.jinja", {}, ALL)],
    "llama3.1": [("llama3.1.jinja", {}, ALL), ("llama3.1.jinja", {"date_string": "01 Jan 2025"}, ["system"])],
    "qwen2.5": [("qwen2.5.jinja", {}, ALL)],
    "qwen3": [("qwen3.jinja", {}, ALL), ("qwen3.jinja", {"enable_thinking": True}, ALL)],
    "qwen3_nothink": [("qwen3.jinja", {"enable_thinking": False}, ALL)],
    "gemma": [("gemma3.jinja", {}, ALL), ("gemma2.jinja", {}, NO_SYSTEM)],
    "mistral_v7": [("mistral_v7.jinja", {}, ALL)],
    "phi3": [("phi3.5.jinja", {}, ALL), ("phi3.jinja", {}, [k for k in ALL if k != "empty_system"])],
}
# qwen3_nothink is the official template with enable_thinking=False: rendered without that argument
OWN_KW = {"qwen3_nothink": {}}


@pytest.fixture(scope="module")
def tokenizers(tokenizer):
    """One tokenizer per family, kept alive for the module (renderers are cached per tokenizer object)."""
    return {name: family_tokenizer(tokenizer, name) for name in BUILTIN}


def renders(tok, template: str, msgs: list[dict], **kw) -> list[str]:
    """Every training example (a prefix ending in a reply, no generation prompt) and every generation
    prompt (a prefix ending before a reply) of one conversation."""
    out = []
    for i, m in enumerate(msgs):
        if m["role"] == "assistant":
            out.append(tok.apply_chat_template(msgs[:i], chat_template=template, tokenize=False,
                                               add_generation_prompt=True, **kw))
            out.append(tok.apply_chat_template(msgs[:i + 1], chat_template=template, tokenize=False, **kw))
    return out


def differences(tok, ours: str, theirs: str, conversations: list[str], ours_kw: dict, theirs_kw: dict) -> list:
    bad = []
    for key in conversations:
        for a, b in zip(renders(tok, ours, CONVERSATIONS[key], **ours_kw),
                        renders(tok, theirs, CONVERSATIONS[key], **theirs_kw)):
            if a != b:
                bad.append((key, a, b))
    return bad


@pytest.mark.parametrize("name", list(CASES))
def test_builtin_renders_what_the_official_template_renders(tokenizers, name):
    tok = tokenizers[name]
    for filename, kw, conversations in CASES[name]:
        ours_kw = OWN_KW.get(name, kw)
        assert not differences(tok, BUILTIN[name].source, official(filename), conversations, ours_kw, kw), \
            (name, filename, kw)


def test_qwen3_builtins_differ_only_in_the_generation_prompt(tokenizers):
    tok, msgs = tokenizers["qwen3"], CONVERSATIONS["reasoning"]
    think, nothink = (renders(tok, BUILTIN[n].source, msgs) for n in ("qwen3", "qwen3_nothink"))
    assert think[1::2] == nothink[1::2]  # the training examples
    assert [p + "<think>\n\n</think>\n\n" for p in think[0::2]] == nothink[0::2]
    assert "Add 2 and 2." not in think[-1] and "<think>\nreverse the letters\n</think>\n\nelppa" in think[-1]


def test_a_different_template_is_told_apart(tokenizers):
    """Negative control: the comparison sees a missing default system prompt, a missing trim, a missing
    bos and a reasoning block kept in earlier turns."""
    cases = [
        ("qwen2.5", CHATML, "qwen2.5.jinja", ["single"]),  # no default system prompt
        ("llama3", BUILTIN["llama3"].source.replace(" | trim", ""), "llama3.jinja", ["whitespace"]),
        ("gemma", BUILTIN["gemma"].source.replace("{{ '<bos>' }}", ""), "gemma3.jinja", ["single"]),
        ("qwen3", CHATML, "qwen3.jinja", ["reasoning"]),
        # the control of the control: no conversation, no difference
        ("qwen3", BUILTIN["qwen3"].source, "qwen3.jinja", []),
    ]
    for name, template, filename, conversations in cases:
        found = differences(tokenizers[name], template, official(filename), conversations, {}, {})
        assert bool(found) == bool(conversations), (name, filename)


def test_gemma_refuses_what_the_official_template_refuses(tokenizers):
    tok = tokenizers["gemma"]
    for template in (BUILTIN["gemma"].source, official("gemma3.jinja")):
        with pytest.raises(Exception, match="Conversation roles must alternate"):
            tok.apply_chat_template([A1, U1, A1], chat_template=template, tokenize=False)


@pytest.mark.parametrize("name", list(BUILTIN))
def test_builtin_markers_and_end_of_turn(tokenizer, tokenizers, name):
    b = BUILTIN[name]
    assert b.end_of_turn in b.markers and b.end_of_turn in b.source and b.family
    tok = tokenizers[name]
    assert resolve_template(name, tok, "t") == b.source
    assert tok.convert_ids_to_tokens(end_of_turn_id(name, tok)) == b.end_of_turn
    for m in b.markers:  # each marker is one token
        assert len(tok(m, add_special_tokens=False)["input_ids"]) == 1, m
    if name not in ("chatml", "qwen2.5", "llama3", "llama3.1"):  # the embedded tokenizer lacks the others' tokens
        with pytest.raises(DataError, match=rf"data.chat_template={name} needs the special tokens \["):
            resolve_template(name, tokenizer, "the embedded tokenizer")
