"""Config: every group option composes; typos and wrong types fail naming the key; batch arithmetic."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from distsft.batch import resolve_batch
from distsft.config import ConfigError
from tests.conftest import CONF, ROOT, compose_cfg, typed_cfg

GROUPS = ["model", "data", "optim", "schedule", "parallel", "trainer", "logging", "experiment", "recipe"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_group_option_composes(group, option):
    extra = ["data.train_files=[some.jsonl]"] if (group, option) in {("data", "jsonl")} else []
    if group == "experiment" and "data" in (CONF / group / f"{option}.yaml").read_text():
        extra = ["data.train_files=[some.jsonl]"]
    cfg = typed_cfg(f"{group}={option}", *extra)
    assert cfg.output_dir


def test_every_schema_field_has_a_docstring():
    import dataclasses
    import inspect

    import distsft.config as c

    seen, todo = [], [c.Config]
    while todo:  # every schema of the tree, found from the root (a new group cannot be forgotten here)
        cls = todo.pop()
        seen.append(cls)
        body = inspect.getsource(cls).splitlines()
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                todo.append(type(default))
                continue
            idx = next(i for i, line in enumerate(body) if line.strip().startswith(f"{f.name}:"))
            assert body[idx - 1].strip().startswith("#:"), f"{cls.__name__}.{f.name} has no #: docstring"
    assert len(seen) == 13  # Config and its 12 groups


def test_unknown_key_fails_naming_it():
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg("trainer.lrr=1")
    assert "lrr" in str(e.value.__cause__ or e.value)


def test_a_plus_key_typo_fails_naming_the_key_and_the_likely_one():
    """`+trainer.max_step=3` (Hydra suggests `+` after a typo) composes, but a key no schema has is refused."""
    with pytest.raises(ConfigError, match=r"unknown config key trainer.max_step .*did you mean trainer.max_steps\?"):
        typed_cfg("+trainer.max_step=3")
    with pytest.raises(ConfigError, match=r"unknown config key optim.betas"):
        typed_cfg("+optim.betas=[0.9,0.95]")
    assert typed_cfg("++trainer.max_steps=3").trainer.max_steps == 3  # ++ on a key the schema has is fine


def test_wrong_type_fails_naming_key():
    with pytest.raises((ConfigCompositionException, ValidationError)) as e:
        compose_cfg("trainer.max_steps=abc")
    msg = str(e.value) + str(e.value.__cause__)
    assert "max_steps" in msg


def test_bad_choice_names_key_and_allowed_values():
    with pytest.raises(ConfigError, match=r"schedule.name='cosin' is not one of cosine, linear, constant"):
        typed_cfg("schedule.name=cosin")


def test_cli_typo_exits_with_message_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "distsft.train", "trainer.lrr=1", f"output_dir={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "lrr" in proc.stderr and "TrainerConfig" in proc.stderr
    assert not out.exists()


def test_output_dir_is_deterministic():
    assert "${now" not in (CONF / "config.yaml").read_text().split("output_dir:")[1].splitlines()[0]
    assert typed_cfg().output_dir == typed_cfg().output_dir


@pytest.mark.parametrize("micro,accum,glob,world,expect", [
    (4, None, 32, 2, (4, 4, 2, 32)),
    (None, 2, 16, 2, (4, 2, 2, 16)),
    (2, 3, None, 4, (2, 3, 4, 24)),
    (4, 2, 8, 1, (4, 2, 1, 8)),
])
def test_batch_arithmetic_derives_the_third(micro, accum, glob, world, expect):
    p = resolve_batch(micro, accum, glob, world)
    assert (p.micro_batch_size, p.grad_accum, p.world_size, p.global_batch_size) == expect


def test_batch_arithmetic_indivisible_shows_numbers():
    with pytest.raises(ConfigError, match=r"global_batch_size=10 is not divisible by micro_batch_size 4 x world_size 1 = 4"):
        resolve_batch(4, None, 10, 1)
    with pytest.raises(ConfigError, match=r"4 x grad_accum 2 x world_size 2 = 16 != trainer.global_batch_size=8"):
        resolve_batch(4, 2, 8, 2)
    with pytest.raises(ConfigError, match="set at least two"):
        resolve_batch(4, None, None, 1)


def test_readme_reference_is_current():
    from distsft.config import reference

    assert reference() in (ROOT / "README.md").read_text(), "README config reference is stale: python -m distsft.config"


def test_speed_switches_may_change_at_a_resume_but_training_keys_may_not():
    from omegaconf import OmegaConf

    from distsft.provenance import training_differences

    def resolved(*over):
        return OmegaConf.to_container(OmegaConf.structured(typed_cfg(*over)))

    base = resolved()
    assert training_differences(base, resolved("model.compile=true", "model.gradient_checkpointing=true",
                                               "model.checkpoint_every=2", "trainer.spike_factor=5",
                                               "model.tiled_mlp_shards=4", "model.offload_checkpoints=true",
                                               "trainer.loss_chunk=64")) == []
    assert training_differences(base, resolved("optim.lr=1e-3")) == ["optim.lr: was 0.003, now 0.001"]


def test_the_embedded_recipe_applies_only_to_the_embedded_model_and_data():
    """The tiny recipe (LR 3e-3, 4 epochs, samples, outputs/tiny) is chosen by composition for model=tiny (or
    tiny_base) with data=tiny; any other model preset or data=jsonl starts from the generic defaults, without
    naming an experiment (it would wreck a pretrained model's weights at 3e-3)."""
    generic = typed_cfg("recipe=none")
    assert (generic.run_name, generic.output_dir, generic.optim.lr, generic.trainer.epochs,
            generic.logging.sample_every) == ("run", "outputs/run", 2e-5, 1.0, 0)
    recipe = ("run_name", "optim.lr", "trainer.epochs", "trainer.eval_every", "trainer.save_every",
              "logging.sample_every")
    from omegaconf import OmegaConf

    def values(*over):
        cfg = OmegaConf.structured(typed_cfg(*over))
        return {k: OmegaConf.select(cfg, k) for k in recipe}

    tiny = values()
    assert (tiny["run_name"], tiny["optim.lr"], tiny["trainer.epochs"]) == ("tiny", 3e-3, 4)
    assert values("model=tiny_base") == tiny == values("experiment=tiny", "model=llama3_1b")
    plain = values("recipe=none")
    models = sorted(p.stem for p in (CONF / "model").glob("*.yaml") if not p.stem.startswith("tiny"))
    for over in [(f"model={m}",) for m in models] + [("data=jsonl",), ("model=tiny_base", "data=jsonl")]:
        assert values(*over) == plain, over