"""Try the result: ``python -m distsft.generate run_dir=outputs/tiny prompt="What is 2 plus 2?"``
(console script ``distsft-generate``).

Loads ``run_dir/final`` — a full or merged model, or an adapter on its base rebuilt from the run's
config — with the tokenizer saved there, so prompts are rendered with the training chat template.
With ``prompts_file=cases.jsonl`` (rows ``{"prompt": ..., "expected": ..., "split": ...}``, split
optional, e.g. exact / variation / out_of_domain) it answers every prompt and reports exact-match
and contains-match rates per split, written to ``run_dir/generate_eval.json``.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from .config import ConfigError, ModelConfig, register_configs


@dataclass
class GenerateConfig:
    #: A distsft run dir (its final/ is loaded).
    run_dir: str = MISSING
    #: One prompt to answer (a user turn).
    prompt: Optional[str] = None
    #: JSONL of {"prompt", "expected", "split"} to score.
    prompts_file: Optional[str] = None
    #: Tokens to generate per answer (greedy).
    max_new_tokens: int = 64


register_configs()
ConfigStore.instance().store(name="distsft_generate_schema", node=GenerateConfig)
# the primary config: the schema, and a Hydra that writes nothing of its own
ConfigStore.instance().store(name="distsft_generate", node={
    "defaults": ["distsft_generate_schema", {"override hydra/job_logging": "none"},
                 {"override hydra/hydra_logging": "none"}, "_self_"],
    "hydra": {"run": {"dir": "."}, "output_subdir": None}})


def load_final(run_dir: Path):
    """(model, tokenizer) of run_dir/final, whatever the export mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .model.source import check_config, check_weights, loading

    final = run_dir / "final"
    if not final.is_dir():
        raise ConfigError(f"run_dir={run_dir}: no final/ (the run has not finished, or export.enabled=false)")
    with loading("run_dir", str(final), "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(final)
    if (final / "adapter_config.json").exists():
        from peft import PeftModel

        from .model.load import load_model

        cfg = OmegaConf.to_container(OmegaConf.load(final / "distsft_config.yaml"))
        base = load_model(ModelConfig(**cfg["model"]), cfg["trainer"]["seed"])
        with loading("run_dir", str(final), "adapter"):
            model = PeftModel.from_pretrained(base, final)
    else:  # a full or merged export: its files are checked first (one line naming the file, no traceback)
        check_config(final, "run_dir", trust_remote_code=False)
        check_weights(final, "run_dir")
        with loading("run_dir", str(final), "model"):
            model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    return model.eval(), tokenizer


def answer(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    from .trainer.samples import greedy_reply

    return greedy_reply(model, tokenizer, prompt, max_new_tokens, use_cache=True).strip()


def score(rows: list[dict], answers: list[str]) -> dict:
    """Exact-match (whitespace-trimmed) and contains-match rates per split, and overall."""
    by = defaultdict(lambda: {"n": 0, "exact": 0, "contains": 0})
    for row, got in zip(rows, answers):
        want = str(row["expected"]).strip()
        for split in (row.get("split", "all"), "overall") if row.get("split") else ("overall",):
            s = by[split]
            s["n"] += 1
            s["exact"] += got == want
            s["contains"] += want in got
    return {k: {"n": v["n"], "exact_match": v["exact"] / v["n"], "contains_match": v["contains"] / v["n"]}
            for k, v in by.items()}


def read_cases(path: Path) -> list[dict]:
    """The prompts file's rows ({"prompt": str, "expected": ..., "split": optional}); a bad line is named."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"prompts_file={path}: cannot be read ({e.strerror if isinstance(e, OSError) else e})") \
            from None
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ConfigError(f"{path} line {n}: not JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or "expected" not in row:
            raise ConfigError(f"{path} line {n}: expected {{\"prompt\": str, \"expected\": ...}}")
        rows.append(row)
    return rows


def run_generate(cfg: GenerateConfig, stream=sys.stdout) -> dict | None:
    run_dir = Path(cfg.run_dir)
    if not cfg.prompt and not cfg.prompts_file:
        raise ConfigError("give prompt=\"...\" or prompts_file=cases.jsonl")
    rows = read_cases(Path(cfg.prompts_file)) if cfg.prompts_file else None  # a bad file fails before the model loads
    model, tokenizer = load_final(run_dir)
    if cfg.prompt:
        print(answer(model, tokenizer, cfg.prompt, cfg.max_new_tokens), file=stream)
    if rows is None:
        return None
    answers = [answer(model, tokenizer, r["prompt"], cfg.max_new_tokens) for r in rows]
    report = {"scores": score(rows, answers),
              "answers": [{**r, "answer": a} for r, a in zip(rows, answers)]}
    (run_dir / "generate_eval.json").write_text(json.dumps(report, indent=2) + "\n")
    for split, s in report["scores"].items():
        print(f"{split}: {s['n']} prompts, exact match {s['exact_match']:.1%}, contains {s['contains_match']:.1%}",
              file=stream)
    return report


@hydra.main(version_base="1.3", config_path=None, config_name="distsft_generate")
def main(cfg: DictConfig) -> None:
    from .train import with_user_errors

    with_user_errors(run_generate, cfg, typed=OmegaConf.to_object)


if __name__ == "__main__":
    main()
