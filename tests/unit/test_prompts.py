"""Sample prompts from the user's data (distsft/data/prompts.py, trainer/samples.with_sample_prompts): with
logging.sample_prompts empty, the first user turns of the eval files, else the training files; the embedded
default keeps its own prompts by composition (the tiny recipe)."""

from __future__ import annotations

import json
from pathlib import Path

from distsft.config import DataConfig, LoggingConfig
from distsft.data.prompts import LONGEST, data_prompts
from distsft.trainer.samples import with_sample_prompts
from tests.conftest import typed_cfg


def chat(user: str, system: str | None = None) -> dict:
    turns = [{"role": "system", "content": system}] if system else []
    return {"messages": [*turns, {"role": "user", "content": user}, {"role": "assistant", "content": "ok"}]}


def write(path: Path, lines: list) -> str:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


def test_prompts_come_from_the_eval_files_first_then_the_training_files(tmp_path):
    train = write(tmp_path / "train.jsonl", [chat(f"train {i}") for i in range(5)])
    val = write(tmp_path / "val.jsonl", [{"instruction": "val 0", "output": "x"},
                                         {"instruction": "val 1", "output": "y"}])
    assert data_prompts(DataConfig(train_files=[train], val_files=[val]), 3) == [
        ("val 0", f"{val} row 1"), ("val 1", f"{val} row 2"), ("train 0", f"{train} row 1")]
    assert [p for p, _ in data_prompts(DataConfig(train_files=[train]), 2)] == ["train 0", "train 1"]


def test_rows_without_a_short_first_user_turn_are_passed_over(tmp_path):
    train = write(tmp_path / "train.jsonl", ["{not json", "", chat("x" * (LONGEST + 1)), {"messages": "?"},
                                             chat("  Is this one short?  ", system="Be brief.")])
    # line 5 of the file
    assert data_prompts(DataConfig(train_files=[train]), 3) == [("Is this one short?", f"{train} row 5")]


def test_other_files_go_through_the_data_loader(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "pc.parquet"
    pq.write_table(pa.table({"prompt": ["first", "second"], "completion": ["a", "b"]}), path)
    assert data_prompts(DataConfig(train_files=[str(path)]), 5) == [("first", f"{path} row 1"),
                                                                    ("second", f"{path} row 2")]


def test_the_logging_config_gets_the_datas_prompts_only_when_it_has_none(tmp_path):
    data = DataConfig(train_files=[write(tmp_path / "t.jsonl", [chat("hello there")])])
    assert with_sample_prompts(LoggingConfig(sample_every=5), data).sample_prompts == ["hello there"]
    own = LoggingConfig(sample_every=5, sample_prompts=["mine"])
    assert with_sample_prompts(own, data) is own
    assert with_sample_prompts(LoggingConfig(sample_every=0), data).sample_prompts == []  # samples off: not read
    empty = DataConfig(train_files=[write(tmp_path / "e.jsonl", [chat("y" * (LONGEST + 1))])])
    assert with_sample_prompts(LoggingConfig(sample_every=5), empty).sample_every == 0  # nothing to ask: off


def test_the_embedded_default_keeps_its_prompts_and_user_data_has_none_set():
    assert typed_cfg().logging.sample_prompts == ["What is 12 plus 7?", "Spell river backwards.",
                                                  "What is the capital of Peru?"]
    assert typed_cfg("data=jsonl", "data.train_files=[my.jsonl]").logging.sample_prompts == []
