"""`blockattn train` refuses options that do not apply to the experiment, before any work."""
import pytest

from blockattn import cli


@pytest.mark.parametrize("argv, message", [
    (["train", "dma", "--tiny", "--length", "512"], "--length and --windows apply to seer only"),
    (["train", "landmark", "--tiny", "--windows", "4"], "--length and --windows apply to seer only"),
    (["train", "seer", "--tiny", "--length", "0"], "--length must be a positive int"),
    (["train", "seer", "--tiny", "--windows", "-1"], "--windows must be a positive int"),
])
def test_seer_only_options_are_refused_elsewhere(argv, message, tmp_path, capsys):
    assert cli.main(argv + ["--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
