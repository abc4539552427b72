import json

import pytest
import torch

from blockattn.cli import main


def test_calibrate_moa_forwards_its_own_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["calibrate", "moa", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "MoA calibration" in out and "--densities" in out


@pytest.mark.parametrize("name, text", [("vertical_slash", "--scale"), ("xattention", "--coverage")])
def test_calibrate_method_verbs_forward_their_options(capsys, name, text):
    with pytest.raises(SystemExit) as exit_info:
        main(["calibrate", name, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"blockattn calibrate {name}" in out and text in out and "--tokens" in out


def test_calibrate_unknown_name_lists_the_known_ones(capsys):
    with pytest.raises(SystemExit):
        main(["calibrate", "sale"])
    assert "invalid choice: 'sale' (choose from 'moa', 'vertical_slash', 'xattention')" in capsys.readouterr().err


def tiny_llama(layers=2, heads=4, kv_heads=2):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=kv_heads,
                                      max_position_embeddings=512)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def test_calibrated_configs_drive_hf_patch(tmp_path):
    """The calibrations on a tiny model write JSON that hf.patch loads; each layer then runs its own
    heads' settings (a config that keeps everything reproduces the unpatched model)."""
    from blockattn import hf, methods
    from blockattn.methods import calibration
    model = tiny_llama()
    ids = torch.randint(0, 97, (1, 320))
    grid = (("stream_llm", 8, 64), ("vertical_and_slash", 40, 120), ("block_sparse", 4, 0))
    config = calibration.calibrate_vertical_slash(model, ids, candidates=grid, score_from=160)
    assert config["layers"] == 2 and config["heads"] == 4
    assert all(0 < e["recall"] <= 1 + 1e-6 for layer in config["patterns"] for e in layer)
    path = tmp_path / "vs.json"
    path.write_text(json.dumps(config))
    thresholds = calibration.calibrate_xattention(model, [ids, ids.flip(1)],
                                                  method=methods.get("xattention", block_size=64))
    assert len(thresholds["thresholds"]) == 2 and len(thresholds["thresholds"][0]) == 4
    xpath = tmp_path / "x.json"
    xpath.write_text(json.dumps(thresholds))
    with torch.no_grad():
        dense = model(ids).logits
        for name, params in (("vertical_slash", {"config": str(path)}),
                             ("xattention", {"thresholds": str(xpath), "block_size": 64})):
            with hf.patch(model, name, **params) as handle:
                out = model(ids).logits
            assert torch.isfinite(out).all() and handle.stats.prefill_calls == 2
        # everything kept: the unpatched model's logits
        keep_all = {"patterns": [[{"pattern": "vertical_and_slash", "vertical_size": 512, "slash_size": 512}] * 4] * 2}
        path.write_text(json.dumps(keep_all))
        with hf.patch(model, "vertical_slash", config=str(path)):
            assert torch.allclose(model(ids).logits, dense, atol=1e-4)
