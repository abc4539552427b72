"""`blockattn train` refuses options that do not apply to the experiment, before any work."""
import pytest

from blockattn import cli


@pytest.mark.parametrize("argv, message", [
    (["train", "dma", "--tiny", "--windows", "4"], "--windows and --eval-windows apply to seer only"),
    (["train", "landmark", "--tiny", "--eval-windows", "1"], "--windows and --eval-windows apply to seer only"),
    (["train", "seer", "--tiny", "--eval-windows", "0"], "--eval-windows must be a positive int"),
    (["train", "landmark", "--tiny", "--length", "512"], "--length applies to seer and dma only"),
    (["train", "seer", "--tiny", "--pairs", "4"], "--pairs and --position-embeddings apply to dma only"),
    (["train", "landmark", "--tiny", "--no-position-embeddings"],
     "--pairs and --position-embeddings apply to dma only"),
    (["train", "dma", "--tiny", "--pairs", "0"], "--pairs must be a positive int"),
    (["train", "seer", "--tiny", "--length", "0"], "--length must be a positive int"),
    (["train", "seer", "--tiny", "--windows", "-1"], "--windows must be a positive int"),
])
def test_seer_only_options_are_refused_elsewhere(argv, message, tmp_path, capsys):
    assert cli.main(argv + ["--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
