"""Settings: typed once (nanodb.config.Settings), valued once (configs/default.yaml)."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from nanodb.config import Settings, builtin_config, load_settings


def test_every_setting_has_its_one_default_in_default_yaml():
    fields = dataclasses.fields(Settings)
    assert all(f.default is dataclasses.MISSING for f in fields), "a second default beside default.yaml"
    assert set(yaml.safe_load(builtin_config("default").read_text())) == {f.name for f in fields}


def test_a_config_file_and_overrides_take_precedence(tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text("k: 3\nbatch_size: 4\n")
    settings = load_settings(config, batch_size=2, model=None)
    assert (settings.k, settings.batch_size, settings.model) == (3, 2, load_settings().model)


def test_an_unknown_key_is_a_clear_error(tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text("batch_sise: 4\n")
    with pytest.raises(ValueError, match="unknown config keys: batch_sise"):
        load_settings(config)
