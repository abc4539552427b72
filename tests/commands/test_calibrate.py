import pytest

from blockattn.cli import main


def test_calibrate_moa_forwards_its_own_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["calibrate", "moa", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "MoA calibration" in out and "--densities" in out


def test_calibrate_unknown_name_lists_the_known_ones(capsys):
    with pytest.raises(SystemExit):
        main(["calibrate", "xattention"])
    assert "invalid choice: 'xattention' (choose from 'moa')" in capsys.readouterr().err
