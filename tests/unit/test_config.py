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

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")  # every group under conf/
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
    from omegaconf import OmegaConf

    from distsft.config import Config

    assert "${now" not in Config.output_dir
    assert not any("${now" in str(OmegaConf.to_container(OmegaConf.load(p))) for p in CONF.rglob("*.yaml"))
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
    with pytest.raises(ConfigError,
                       match=r"global_batch_size=10 is not divisible by micro_batch_size 4 x world_size 1 = 4"):
        resolve_batch(4, None, 10, 1)
    with pytest.raises(ConfigError, match=r"4 x grad_accum 2 x world_size 2 = 16 != trainer.global_batch_size=8"):
        resolve_batch(4, 2, 8, 2)
    with pytest.raises(ConfigError, match="set at least two"):
        resolve_batch(4, None, None, 1)


def test_config_reference_in_the_docs_is_current():
    import re

    from distsft.config_reference import reference

    page = (ROOT / "docs" / "config.md").read_text()
    m = re.search(r"<!-- config-reference:[^\n]*-->\n(.*?)\n<!-- /config-reference -->", page, flags=re.S)
    assert m, "docs/config.md lost its config-reference markers"
    assert m.group(1) == reference(), \
        "docs/config.md's config reference is stale: python -m distsft.config_reference --docs"


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

# -- one source of truth: the schema in distsft/config.py ------------------------------------------------------


def _schema_fields():
    """(dotted key, dataclass, field name, the class's source lines, the field's line) of every leaf of the schema."""
    import dataclasses
    import inspect

    import distsft.config as c

    todo = [(c.Config, "")]
    while todo:
        cls, prefix = todo.pop()
        body = inspect.getsource(cls).splitlines()
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                todo.append((type(default), f"{prefix}{f.name}."))
                continue
            idx = next(i for i, line in enumerate(body) if line.strip().startswith(f"{f.name}:"))
            yield f"{prefix}{f.name}", cls, f.name, body, idx


def test_every_field_doc_is_one_line_of_at_most_100_characters():
    """A field's `#:` doc is what `--help`-like tables (docs/config.md) show: one line that says what a user needs
    to choose the value (allowed values, units, what null means); the story goes on the topic page in docs/."""
    bad = []
    for key, _cls, _name, body, idx in _schema_fields():
        doc, above = body[idx - 1], body[idx - 2].strip()
        if len(doc) > 100:
            bad.append(f"{key}: its #: line has {len(doc)} characters (at most 100)")
        if above.startswith("#"):
            bad.append(f"{key}: its doc runs over several comment lines")
    assert not bad, "\n".join(bad)


def _field_doc(key: str) -> str:
    return next(body[idx - 1].strip().removeprefix("#:").strip()
                for k, _cls, _name, body, idx in _schema_fields() if k == key)


def test_allowed_values_are_named_in_their_field_docs():
    """OmegaConf 2.3 refuses ``Literal[...]`` annotations in structured configs ("Unexpected type annotation"), so
    the allowed values of a ``str`` field live in one list, ``checks.CHOICES``, checked at compose time. Its field's
    one-line doc must name every one of them (and the default must be one), so the two cannot drift."""
    import re
    from dataclasses import MISSING, field, make_dataclass
    from typing import Literal

    from omegaconf import OmegaConf

    from distsft.checks import CHOICES

    with_literal = make_dataclass("WithLiteral", [("x", Literal["a", "b"], field(default="a"))])
    with pytest.raises(ValidationError, match="Unexpected type annotation"):  # the day this passes: use Literal
        OmegaConf.structured(with_literal)

    fields = {key: (cls, name) for key, cls, name, _body, _idx in _schema_fields()}
    bad = []
    for key, allowed in CHOICES.items():
        assert key in fields, f"checks.CHOICES names {key}, which the schema does not have"
        doc = _field_doc(key)
        missing = [v for v in allowed if not re.search(rf"(?<![\w.-]){re.escape(str(v))}(?![\w-])", doc)]
        if missing:
            bad.append(f"{key}: its doc does not name {missing}: {doc!r}")
        cls, name = fields[key]
        default = cls.__dataclass_fields__[name].default
        if default is not MISSING and default not in allowed:
            bad.append(f"{key}: the default {default!r} is not one of {allowed}")
    assert not bad, "\n".join(bad)


def _yaml_files():
    """Every config file under conf/ that distsft owns (not Hydra's own hydra/ group): (group, path); config.yaml
    is a group of its own ("")."""
    for path in sorted(CONF.rglob("*.yaml")):
        rel = path.relative_to(CONF)
        if rel.parts[0] != "hydra":
            yield (rel.parts[0] if len(rel.parts) > 1 else ""), path


def _leaves(node, prefix=""):
    """(dotted key, value) of every leaf of a nested dict (a list is a leaf)."""
    for k, v in node.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _at(tree: dict, key: str):
    for part in key.split("."):
        tree = tree[part]
    return tree


def test_config_files_do_not_restate_schema_defaults():
    """The defaults live in distsft/config.py only. A YAML file under conf/ (a group option, a recipe, an
    experiment, config.yaml) that sets a key to the schema's default shadows the schema: a new default would not
    reach the composed config.

    The rule: a file may set a key to its default only when another file of the same group sets that key to
    something else, so that the option names its choice (parallel/ddp.yaml's ``strategy: ddp`` against
    fsdp.yaml's ``strategy: fsdp``, zero3.yaml's ``zero_stage: 3``). Values are compared as composed: merged into
    the schema (``1`` and ``1.0`` of a float key are one value) and resolved (``${distsft_asset:tiny-llama}`` is
    the default model directory)."""
    from omegaconf import OmegaConf

    from distsft.config import Config, register_configs

    register_configs()
    schema = OmegaConf.structured(Config)
    default = OmegaConf.to_container(schema, resolve=True)
    settings: dict[tuple[str, str], dict[str, object]] = {}  # (group, key) -> {file: composed value}
    for group, path in _yaml_files():
        text = path.read_text()
        data = {k: v for k, v in (OmegaConf.to_container(OmegaConf.load(path)) or {}).items()
                if k not in ("defaults", "hydra")}
        tree = data if group == "" or "# @package _global_" in text else {group: data}
        merged = OmegaConf.to_container(OmegaConf.merge(schema, tree), resolve=True)
        for key, raw in _leaves(tree):  # a merged ??? keeps the schema's value: it is no value of its own
            value = raw if raw == "???" else _at(merged, key)
            settings.setdefault((group, key), {})[str(path.relative_to(CONF))] = value
    bad = []
    for (_group, key), by_file in settings.items():
        value_by_default = _at(default, key)
        if all(v == value_by_default for v in by_file.values()):
            bad += [f"conf/{rel}: {key}: {v!r} is distsft/config.py's default; remove it" for rel, v in by_file.items()]
    assert not bad, "\n".join(bad)


def _compose_over(schema, *overrides: str):
    """The composed config with ``schema`` registered in the real one's place (restored afterwards)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore

    from distsft.config import register_configs

    register_configs()
    ConfigStore.instance().store(name="distsft_schema", node=schema)
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))
    finally:
        register_configs()  # the real schema again, for every later test


def test_a_default_changed_in_the_schema_reaches_the_composed_config():
    """No YAML file shadows the schema's defaults: a new default of trainer.save_every or optim.lr in
    distsft/config.py is what `python -m distsft.train` composes, whichever trainer or optimizer is chosen (the
    generic defaults: recipe=none, or the embedded recipe's lr would win, as it should)."""
    from dataclasses import field, make_dataclass

    import distsft.config as c

    # distsft/config.py with two defaults changed (make_dataclass: real annotations, not this module's strings)
    trainer = make_dataclass("TrainerConfig", [("save_every", int, field(default=7))], bases=(c.TrainerConfig,))
    optim = make_dataclass("OptimConfig", [("lr", float, field(default=1.25e-4))], bases=(c.OptimConfig,))
    schema = make_dataclass("Config", [("trainer", c.TrainerConfig, field(default_factory=trainer)),
                                       ("optim", c.OptimConfig, field(default_factory=optim))], bases=(c.Config,))

    real = compose_cfg("recipe=none")
    assert (real.trainer.save_every, real.optim.lr) == (100, 2e-5)
    optims = [f"optim={p.stem}" for p in sorted((CONF / "optim").glob("*.yaml"))]
    for over in [(), ("trainer=default",), *[(o,) for o in optims]]:
        cfg = _compose_over(schema, "recipe=none", *over)
        assert (cfg.trainer.save_every, cfg.optim.lr) == (7, 1.25e-4), over
    assert compose_cfg("recipe=none").trainer.save_every == 100  # the real schema is back
