"""Chat templates: the tokenizer's own, a built-in one by name, or a Jinja file.

The chosen template is also written into the exported tokenizer, so the trained model is served
with the template it was trained on.
"""

from __future__ import annotations

from pathlib import Path

from .sources import DataError

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA3 = (
    "{{ '<|begin_of_text|>' }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

BUILTIN = {"chatml": (CHATML, ("<|im_start|>", "<|im_end|>"), "<|im_end|>"),
           "llama3": (LLAMA3, ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
                      "<|eot_id|>")}


def resolve_template(name: str | None, tokenizer, tokenizer_name: str) -> str:
    """The Jinja source to render with; checks that a built-in template's markers are single tokens."""
    if name is None:
        if not tokenizer.chat_template:
            raise DataError(f"tokenizer {tokenizer_name} has no chat template: set data.chat_template to "
                            f"{' or '.join(BUILTIN)} or a .jinja file", reason="config")
        return tokenizer.chat_template
    if name in BUILTIN:
        source, markers, _ = BUILTIN[name]
        vocab = tokenizer.get_vocab()
        missing = [m for m in markers if m not in vocab]
        if missing:
            raise DataError(f"data.chat_template={name} needs the special tokens {missing}, which tokenizer "
                            f"{tokenizer_name} lacks; use its own template (data.chat_template=null) or another",
                            reason="config")
        return source
    path = Path(name)
    if path.suffix not in (".jinja", ".j2") or not path.is_file():
        raise DataError(f"data.chat_template={name}: expected null, {', '.join(BUILTIN)} or an existing "
                        ".jinja file", reason="config")
    return path.read_text()


def end_of_turn_id(name: str | None, tokenizer) -> int | None:
    """The token that ends an assistant turn under a built-in template (added to generation eos)."""
    if name in BUILTIN:
        return tokenizer.convert_tokens_to_ids(BUILTIN[name][2])
    return None
