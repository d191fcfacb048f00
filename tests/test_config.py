"""Typed YAML config: defaults, every shipped config loads, unknown keys and bad values are named."""

from pathlib import Path

import pytest

from cluster.config import ConfigError, load_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults():
    cfg = load_config()
    assert cfg.model is None and cfg.engine.max_num_seqs == 64


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path):
    load_config(path)


def test_values_and_overrides(tmp_path):
    cfg = load_config(write(tmp_path, "model: /m\nengine:\n  max_num_seqs: 8\n  dtype: bfloat16\n"),
                      {"engine": {"dtype": "float16"}})
    assert (cfg.model, cfg.engine.max_num_seqs, cfg.engine.dtype) == ("/m", 8, "float16")


@pytest.mark.parametrize("text, message", [
    ("engine:\n  max_seqs: 8\n", "unknown key 'engine.max_seqs'"),
    ("modle: /m\n", "unknown key 'modle'"),
    ("engine:\n  max_num_seqs: lots\n", "engine.max_num_seqs: expected int, got 'lots'"),
    ("engine:\n  max_num_seqs: true\n", "engine.max_num_seqs: expected int"),
    ("engine:\n  dtype: float8\n", "engine: dtype must be one of"),
    ("engine:\n  max_num_seqs: 0\n", "max_num_seqs must be >= 1"),
    ("engine: [1, 2]\n", "engine: expected a mapping"),
    ("- a\n", "expected a mapping at the top level"),
    ("engine: {\n", "not valid YAML"),
])
def test_errors_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(write(tmp_path, text))
