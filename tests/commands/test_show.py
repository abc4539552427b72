"""`blockattn show` draws any drawable pattern to a PNG and reports bad input with a message."""
import pytest

from blockattn import cli
from blockattn.commands.show import drawable_patterns, parse_params


@pytest.mark.parametrize("argv", [
    ["neighborhood", "grid=(12,12)", "window=5", "block_q=16", "block_k=16"],
    ["s2_attention", "q_len=256", "heads=4", "vertical_stride=4", "local_blocks=1", "block_q=32", "block_k=32"],
    ["block_causal", "frame_len=20", "num_frames=4", "prefix=5", "block_q=16", "block_k=16"],
])
def test_show_writes_png(tmp_path, capsys, argv):
    out = tmp_path / "mask.png"
    assert cli.main(["show", *argv, "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in capsys.readouterr().out


def test_show_large_layout_skips_token_zoom(tmp_path):
    out = tmp_path / "big.png"
    assert cli.main(["show", "causal", "q_len=4096", "-o", str(out)]) == 0 and out.exists()


def test_show_errors(tmp_path, capsys):
    out = str(tmp_path / "x.png")
    assert cli.main(["show", "nonsense", "-o", out]) == 2
    assert "unknown pattern" in capsys.readouterr().err
    assert cli.main(["show", "neighborhood", "grid=(8,8)", "window=9", "-o", out]) == 2
    assert "window" in capsys.readouterr().err
    assert cli.main(["show", "neighborhood", "oops", "-o", out]) == 2
    assert "key=value" in capsys.readouterr().err


def test_parse_params_and_listing():
    assert parse_params(["a=(1,2)", "b=True", "c=word"]) == {"a": (1, 2), "b": True, "c": "word"}
    names = drawable_patterns()
    assert "neighborhood" in names and "to_tiled" not in names
