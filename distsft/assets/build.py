"""Embedded default assets: builds the tiny model config, its tokenizer and the bundled data.

Nothing here is downloaded. Running ``python -m distsft.assets.build`` regenerates, byte for
byte, the files shipped next to this module:

    tiny-llama/config.json             a 2-layer Llama-architecture config (random init at train time)
    tiny-llama/generation_config.json
    tiny-llama/tokenizer.json, tokenizer_config.json, chat_template.jinja
                                       a byte-level BPE trained on the bundled data, ChatML template
    data/tiny_sft.jsonl                deterministic, learnable instruction data (chat messages)
    tiny-llama-base/                   the same model *pretrained* (model.safetensors, ~0.7 MB) on plain
                                       text of other generated tasks (no chat template, another seed), and
                                       the same tokenizer: a base for LoRA/QLoRA that adapters can adapt
                                       (``model=tiny_base``); ``--base`` rebuilds only it (deterministic on
                                       one platform; another CPU may round differently)

The data is a mix of small tasks with a checkable answer (arithmetic, reversing words,
counting, capitals, sorting) so that a model of ~0.2M parameters visibly learns in a minute
on a CPU: the training loss of the embedded default falls clearly below its first value.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ASSETS = Path(__file__).resolve().parent
MODEL_DIR = ASSETS / "tiny-llama"
BASE_DIR = ASSETS / "tiny-llama-base"
DATA_FILE = ASSETS / "data" / "tiny_sft.jsonl"

SPECIAL_TOKENS = [
    "<|endoftext|>",  # pad
    "<|im_start|>",
    "<|im_end|>",  # ChatML end of turn = eos
    "<|begin_of_text|>",  # Llama-3 style template tokens, so both built-in templates tokenize
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

WORDS = (
    "apple river stone cloud tiger lemon piano rocket garden silver window forest candle "
    "yellow bridge coffee dragon island jacket kettle ladder marble needle orange pencil "
    "rabbit saddle tomato violin wagon zebra anchor basket castle dolphin engine falcon"
).split()
CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Egypt": "Cairo",
    "Canada": "Ottawa", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo", "Chile": "Santiago",
    "Greece": "Athens", "Poland": "Warsaw", "India": "New Delhi", "Cuba": "Havana",
}
SYSTEMS = ["You are a helpful assistant.", "Answer briefly and exactly."]


def _task(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(6)
    if kind == 0:
        a, b = rng.randrange(100), rng.randrange(100)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    if kind == 1:
        ws = rng.sample(WORDS, rng.randint(2, 6))
        return "Reverse the words: " + " ".join(ws), " ".join(reversed(ws))
    if kind == 2:
        ws = rng.sample(WORDS, rng.randint(2, 7))
        return "How many words are in: " + " ".join(ws) + "?", f"There are {len(ws)} words."
    if kind == 3:
        country = rng.choice(sorted(CAPITALS))
        return f"What is the capital of {country}?", f"The capital of {country} is {CAPITALS[country]}."
    if kind == 4:
        ws = rng.sample(WORDS, rng.randint(2, 6))
        return "Sort alphabetically: " + ", ".join(ws), ", ".join(sorted(ws))
    w = rng.choice(WORDS)
    return f"Spell {w} backwards.", w[::-1]


def make_examples(n: int = 1200, seed: int = 1234) -> list[dict]:
    """Chat examples: 1-3 user/assistant turns, a system prompt on a third of them."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        messages = []
        if rng.random() < 1 / 3:
            messages.append({"role": "system", "content": rng.choice(SYSTEMS)})
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            question, answer = _task(rng)
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        out.append({"messages": messages})
    return out


def build_tokenizer(texts: list[str], vocab_size: int = 640):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
        model_max_length=1024,
    )


def model_config(vocab_size: int, tokenizer) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 192,  # every projection a multiple of 32: bitsandbytes 4-bit CPU kernels need it
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "attention_dropout": 0.0,
        "use_cache": False,
        "bos_token_id": None,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def pretrain_base(steps: int = 600, batch: int = 16, length: int = 128, seed: int = 0) -> float:
    """Pretrain the tiny model on plain text ("question answer" lines of 4,000 generated tasks, seed 7: other
    examples than the bundled SFT data, and no chat template) and save it to tiny-llama-base. Returns the
    final training loss."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    text = "".join(f"{m['content']}\n" for ex in make_examples(4000, seed=7) for m in ex["messages"]
                   if m["role"] != "system")
    ids = torch.tensor(tokenizer(text)["input_ids"])
    windows = ids[: len(ids) // length * length].view(-1, length)  # [N, length]: plain causal LM windows
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(MODEL_DIR), attn_implementation="sdpa")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30) * max(0.1, 1 - s / steps))
    g = torch.Generator().manual_seed(seed)
    loss = torch.tensor(0.0)
    for _ in range(steps):
        x = windows[torch.randint(len(windows), (batch,), generator=g)]
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
    shutil.rmtree(BASE_DIR, ignore_errors=True)
    model.save_pretrained(BASE_DIR)
    tokenizer.save_pretrained(BASE_DIR)
    shutil.copy(MODEL_DIR / "generation_config.json", BASE_DIR / "generation_config.json")
    return float(loss)


def main() -> None:
    import sys

    if sys.argv[1:] == ["--base"]:
        print(f"wrote {BASE_DIR} (final pretraining loss {pretrain_base():.3f})")
        return
    examples = make_examples()
    DATA_FILE.parent.mkdir(parents=True, exist_ok=True)
    with DATA_FILE.open("w") as f:
        for ex in examples:
            f.write(json.dumps(ex) + "\n")
    texts = [m["content"] for ex in examples for m in ex["messages"]] + [
        "system user assistant"
    ]
    tokenizer = build_tokenizer(texts)
    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(MODEL_DIR)
    vocab = len(tokenizer)
    cfg = model_config(vocab, tokenizer)
    (MODEL_DIR / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
           "do_sample": False, "max_new_tokens": 32}
    (MODEL_DIR / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    print(f"wrote {DATA_FILE} ({len(examples)} examples) and {MODEL_DIR} (vocab {vocab})")
    print(f"wrote {BASE_DIR} (final pretraining loss {pretrain_base():.3f})")


if __name__ == "__main__":
    main()
