"""Chat templates: the tokenizer's own, a built-in one by name, or a Jinja file.

The chosen template is also written into the exported tokenizer, so the trained model is served
with the template it was trained on.

Each built-in renders, for conversations of system/user/assistant turns with string content,
exactly what its family's official template (the Jinja in the model's ``tokenizer_config.json``)
renders, with and without the generation prompt; ``tests/unit/test_builtin_templates.py`` proves it
against verbatim copies in ``tests/assets/templates/``. The built-ins write their special tokens
literally instead of reading ``bos_token``/``eos_token``, so a base model's tokenizer (whose bos/eos
may be others) renders them the same. Tools and images are left out: a tool-calling row under a built-in
is refused (it needs the family's own template, see ``tokenize.py``); a ``reasoning_content`` field is
written into the reply as a ``<think>`` block (``chatview.py``), which ``qwen3`` reads back out.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from .sources import DataError

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# meta-llama/Meta-Llama-3-8B-Instruct: the bos before the first message, each turn trimmed
LLAMA3 = (
    "{{ '<|begin_of_text|>' }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' "
    "+ message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# meta-llama/Llama-3.1-8B-Instruct (also 3.3): a system header always, with the knowledge and today's date
# (``date_string``, "26 Jul 2024" unless the caller passes another), the system message trimmed into it
LLAMA31 = (
    "{{ '<|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n'"
    " + 'Cutting Knowledge Date: December 2023\\nToday Date: '"
    " + (date_string if date_string is defined else '26 Jul 2024') + '\\n\\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] | trim }}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set loop_messages = messages %}{% endif %}"
    "{{ '<|eot_id|>' }}"
    "{% for message in loop_messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' "
    "+ message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Qwen/Qwen2.5-7B-Instruct: ChatML, with Qwen's own system message when the conversation has none
QWEN25 = (
    "{% if messages[0]['role'] == 'system' %}"
    "{{ '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{% for message in messages %}{% if not (loop.first and message['role'] == 'system') %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Qwen/Qwen3-0.6B (the Qwen3 family): ChatML; an assistant reply after the last user query is rendered
# with its <think> block (an empty one when it has no reasoning), an earlier one without it; the
# generation prompt opens an empty <think> block when enable_thinking is false
QWEN3 = (
    "{% if messages[0]['role'] == 'system' %}{{ '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% set ns = namespace(found=false, last_query=messages|length - 1) %}"
    "{% for message in messages[::-1] %}"
    "{% if not ns.found and message['role'] == 'user' and not (message['content'].startswith('<tool_response>')"
    " and message['content'].endswith('</tool_response>')) %}"
    "{% set ns.found = true %}{% set ns.last_query = messages|length - 1 - loop.index0 %}{% endif %}"
    "{% endfor %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' or (message['role'] == 'system' and not loop.first) %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% set content = message['content'] %}{% set reasoning = '' %}"
    "{% if '</think>' in content %}"
    "{% set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{% set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{% endif %}"
    "{% if loop.index0 > ns.last_query and (loop.last or reasoning) %}"
    "{{ '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}"
    "{% else %}{{ '<|im_start|>assistant\\n' + content }}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}"
)
QWEN3_NOTHINK = "{% set enable_thinking = false %}" + QWEN3  # the official template with enable_thinking=False

# google/gemma-3-*-it (and Gemma 2, which refuses a system turn): role "model", the system message
# folded into the first user turn, strict user/model alternation, every turn trimmed
GEMMA = (
    "{{ '<bos>' }}"
    "{% if messages[0]['role'] == 'system' %}{% set first_user_prefix = messages[0]['content'] + '\\n\\n' %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n'"
    " + (first_user_prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

# mistralai/Mistral-Large-Instruct-2411 (the "v7" instruct format): no generation prompt, the reply
# follows [/INST] after a space and ends with </s>
MISTRAL_V7 = (
    "{{ '<s>' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + '[/INST]' }}"
    "{% elif message['role'] == 'system' %}{{ '[SYSTEM_PROMPT] ' + message['content'] + '[/SYSTEM_PROMPT]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + '</s>' }}"
    "{% else %}{{ raise_exception('Only user, system and assistant roles are supported!') }}{% endif %}"
    "{% endfor %}"
)

# microsoft/Phi-3.5-mini-instruct (Phi-3 alike, which also renders an empty system turn): a rendering
# without the generation prompt ends with <|endoftext|>, so it is not append-only (see data.multiturn)
PHI3 = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and message['content'] %}{{ '<|system|>\\n' "
    "+ message['content'] + '<|end|>\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ '<|endoftext|>' }}{% endif %}"
)


class Builtin(NamedTuple):
    source: str
    markers: tuple[str, ...]  # tokens the tokenizer must have as single tokens
    end_of_turn: str  # ends an assistant turn; becomes the exported tokenizer's eos
    family: str


_CHATML = ("<|im_start|>", "<|im_end|>")
_LLAMA = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
_THINK = (*_CHATML, "<think>", "</think>")
BUILTIN: dict[str, Builtin] = {
    "chatml": Builtin(CHATML, _CHATML, "<|im_end|>", "ChatML"),
    "llama3": Builtin(LLAMA3, _LLAMA, "<|eot_id|>", "Llama 3"),
    "llama3.1": Builtin(LLAMA31, _LLAMA, "<|eot_id|>", "Llama 3.1 / 3.3"),
    "qwen2.5": Builtin(QWEN25, _CHATML, "<|im_end|>", "Qwen 2.5"),
    "qwen3": Builtin(QWEN3, _THINK, "<|im_end|>", "Qwen 3 (reasoning)"),
    "qwen3_nothink": Builtin(QWEN3_NOTHINK, _THINK, "<|im_end|>", "Qwen 3 (enable_thinking=False)"),
    "gemma": Builtin(GEMMA, ("<bos>", "<start_of_turn>", "<end_of_turn>"), "<end_of_turn>", "Gemma 2 / 3"),
    "mistral_v7": Builtin(MISTRAL_V7, ("<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"),
                          "</s>", "Mistral (v7 instruct)"),
    "phi3": Builtin(PHI3, ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"), "<|end|>",
                    "Phi-3 / 3.5"),
}


def resolve_template(name: str | None, tokenizer, tokenizer_name: str) -> str:
    """The Jinja source to render with; checks that a built-in template's markers are single tokens."""
    if name is None:
        if not tokenizer.chat_template:
            raise DataError(f"tokenizer {tokenizer_name} has no chat template: set data.chat_template to one of "
                            f"{', '.join(BUILTIN)} or a .jinja file", reason="config")
        return tokenizer.chat_template
    if name in BUILTIN:
        builtin = BUILTIN[name]
        vocab = tokenizer.get_vocab()
        missing = [m for m in builtin.markers if m not in vocab]
        if missing:
            raise DataError(f"data.chat_template={name} needs the special tokens {missing}, which tokenizer "
                            f"{tokenizer_name} lacks; use its own template (data.chat_template=null) or another",
                            reason="config")
        return builtin.source
    path = Path(name)
    if path.suffix not in (".jinja", ".j2") or not path.is_file():
        raise DataError(f"data.chat_template={name}: expected null, {', '.join(BUILTIN)} or an existing "
                        ".jinja file", reason="config")
    return path.read_text()


def end_of_turn_id(name: str | None, tokenizer) -> int | None:
    """The token that ends an assistant turn under a built-in template (added to generation eos)."""
    if name in BUILTIN:
        return tokenizer.convert_tokens_to_ids(BUILTIN[name].end_of_turn)
    return None
