"""Model pipeline (source): where the model and its tokenizer come from, checked before anything loads, and what
transformers raises while loading them, said in one line.

    a local directory   model.name_or_path=/path: a readable config.json whose model_type this transformers
                        knows (or whose code it ships: model.trust_remote_code), tokenizer files, and readable
                        weights under model.init=pretrained
    a hub id            owner/name: from the Hub, or from the local cache when the Hub cannot be reached
                        (``distsft.hub``); neither reachable nor cached fails at once, naming the id and how to
                        point at a local copy

Anything transformers still raises while loading (``loading``) becomes a ConfigError naming the key, the source
and the library's own words, on one line.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

from .. import hub
from ..config import ConfigError, ModelConfig
from ..failures import cause

# what a tokenizer directory holds (any one of them)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model", "tekken.json")
# what transformers and the libraries under it raise for a source they cannot load (not a bug of ours)
LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, ImportError)


def looks_local(value: str) -> bool:
    """A local path (leading ./, / or ~, or something that exists) rather than a hub id."""
    return value.startswith((".", "/", "~")) or Path(value).expanduser().exists()


def check_model_source(cfg: ModelConfig) -> None:
    """Everything that can be known about the model's and tokenizer's sources before loading them."""
    tokenizer_key = "model.tokenizer" if cfg.tokenizer else "model.name_or_path"
    for key, value in (("model.name_or_path", cfg.name_or_path), ("model.tokenizer", cfg.tokenizer)):
        if not value:
            continue
        if not looks_local(value):
            check_hub_id(key, value, cfg.revision, tokenizer_only=key == "model.tokenizer")
            continue
        path = Path(value).expanduser()
        if not path.is_dir():
            raise ConfigError(f"{key}={value}: no such directory (a local model directory holds config.json, "
                              "weights and tokenizer files; a hub name has no leading ./, / or ~)")
        if key == "model.name_or_path":
            check_config(path, key, cfg.trust_remote_code)
            if cfg.init == "pretrained":
                check_weights(path, key)
        if key == tokenizer_key and not any((path / f).is_file() for f in TOKENIZER_FILES):
            raise ConfigError(f"{key}={value}: no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...): save the "
                              "tokenizer there, or load it from elsewhere with model.tokenizer=<directory or hub id>")


def check_hub_id(key: str, repo: str, revision: str | None, tokenizer_only: bool = False) -> None:
    """A hub id loads only where the Hub can be asked or the local cache holds it: fail now, not after ~50 s of
    retries."""
    why = hub.unreachable("model")
    files = ("tokenizer_config.json", "tokenizer.json", "config.json") if tokenizer_only else ("config.json",)
    if why is None or hub.cached(repo, files, revision):
        return
    raise ConfigError(f"{key}={repo}: not a local directory, not in the Hugging Face cache ({hub.cache_dir()}), and "
                      f"the Hub cannot be asked ({why}): download it where there is a network (`hf download {repo} "
                      f"--local-dir <dir>`) and set {key}=<dir>, or point HF_HOME at a cache that holds it")


def check_config(directory: Path, key: str, trust_remote_code: bool) -> None:
    """config.json is there, reads as JSON, and names a model_type this transformers knows (or ships its code)."""
    from transformers import CONFIG_MAPPING, __version__

    path = directory / "config.json"
    if not path.is_file():
        raise ConfigError(f"{key}={directory}: no config.json (not a Hugging Face model directory)")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # a UnicodeDecodeError and a JSONDecodeError are ValueErrors
        raise ConfigError(f"{key}: {path} cannot be read as JSON ({cause(e)}): re-download or re-save the "
                          "model") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{key}: {path} holds no JSON object: re-download or re-save the model")
    model_type = config.get("model_type")
    if trust_remote_code and "auto_map" in config:
        return  # the model ships its own configuration code
    if not model_type:
        raise ConfigError(f"{key}: {path} names no model_type: re-download or re-save the model")
    if model_type not in CONFIG_MAPPING:
        raise ConfigError(f"{key}: {path} names model_type {model_type!r}, which transformers {__version__} does not "
                          "know: correct it, upgrade transformers, or, for a model that ships its own code, set "
                          "model.trust_remote_code=true")


def check_weights(directory: Path, key: str) -> None:
    """The directory has weight files and each safetensors header reads (a 0-byte or truncated file would
    otherwise fail deep inside from_pretrained without naming the file)."""
    from safetensors import safe_open

    if not (directory / "config.json").is_file():
        raise ConfigError(f"{key}={directory}: no config.json (not a Hugging Face model directory)")
    files = sorted(directory.glob("*.safetensors")) + sorted(directory.glob("*.bin"))
    if not files:
        raise ConfigError(f"{key}={directory}: no weights (*.safetensors or *.bin); for random weights from its "
                          "config set model.init=config")
    for f in files:
        if f.stat().st_size == 0:
            raise ConfigError(f"{key}: {f} is empty (0 bytes): re-download or re-save the model")
        if f.suffix == ".safetensors":
            try:
                with safe_open(str(f), framework="pt") as st:
                    st.keys()
            except Exception as e:  # safetensors raises its own error type
                raise ConfigError(f"{key}: {f} is not a readable safetensors file ({e}): re-download or re-save "
                                  "the model") from None


def hub_kwargs(name: str) -> dict:
    """``local_files_only`` for a hub id the Hub cannot be asked about (offline, no network): transformers then
    reads the cache at once instead of retrying the network first."""
    return {"local_files_only": True} if not looks_local(name) and hub.unreachable("model") else {}


@contextmanager
def loading(key: str, name: str, what: str):
    """Say what transformers raises while loading ``what`` (the model, its config, the tokenizer) from ``name``
    (the value of ``key``) in one ConfigError."""
    try:
        yield
    except ConfigError:
        raise
    except LOAD_ERRORS as e:
        if isinstance(e, ImportError):
            advice = "install what it names, or choose another option (model.attn_implementation, peft.quantize)"
        elif looks_local(name):
            advice = "check its files (config.json, weights, tokenizer files) and the model.* options"
        else:
            advice = (f"check the id (and model.revision) on the Hub, log in (`hf auth login`) for a gated model, or "
                      f"download it (`hf download {name} --local-dir <dir>`) and set {key}=<dir>")
        raise ConfigError(f"{key}={name}: transformers could not load the {what} ({cause(e)}): {advice}") from e
