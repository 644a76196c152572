"""distsft/hub.py: whether the Hub can be asked is known at once, from the offline variables or one refused
request."""

from __future__ import annotations

from distsft import hub


def test_offline_variables_and_a_refused_endpoint(monkeypatch):
    from huggingface_hub import constants

    from tests.conftest import free_port

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert hub.offline_by_choice("dataset") == "HF_DATASETS_OFFLINE=1" and hub.offline_by_choice("model") is None
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.unreachable("model") == "HF_HUB_OFFLINE=1"
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")
    hub._probe.cache_clear()
    try:
        assert "cannot be reached: ConnectError" in hub.unreachable("model")
    finally:
        hub._probe.cache_clear()
