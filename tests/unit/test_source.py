"""distsft/model/source.py: a hub id the Hub cannot be asked about is refused at once unless the cache holds it
(the local directories' checks run as a user would in tests/integration/test_third_party_errors.py)."""

from __future__ import annotations

import pytest

from distsft import hub


@pytest.mark.parametrize("name", ["owner/model", "gpt2"])
def test_a_hub_id_out_of_reach_and_not_cached_is_refused_at_once(name, monkeypatch, tmp_path):
    from distsft.config import ConfigError, ModelConfig
    from distsft.model.source import check_model_source

    monkeypatch.setattr(hub, "unreachable", lambda kind="model": "HF_HUB_OFFLINE=1")
    monkeypatch.setattr(hub, "cached", lambda *a, **k: False)
    monkeypatch.chdir(tmp_path)  # so that no local directory is called gpt2
    with pytest.raises(ConfigError, match=rf"model.name_or_path={name}: not a local directory, not in the Hugging "
                                          rf"Face cache .* \(HF_HUB_OFFLINE=1\): download it"):
        check_model_source(ModelConfig(name_or_path=name))
    monkeypatch.setattr(hub, "cached", lambda *a, **k: True)  # in the cache: loads from it
    check_model_source(ModelConfig(name_or_path=name))
