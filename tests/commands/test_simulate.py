"""`blockattn simulate` prints the simulator's numbers and rejects bad arguments with a message."""
from blockattn import cli
from blockattn.patterns.simulator import simulate


def test_simulate_prints_prediction(capsys):
    assert cli.main(["simulate", "--grid", "32", "32", "--window", "9", "--tile", "8", "8"]) == 0
    text = capsys.readouterr().out
    sim = simulate((32, 32), window=9, tile_shape=(8, 8))
    assert f"{sim.visited_tiles} / {sim.total_tiles}" in text
    assert f"{sim.speedup_upper_bound:.2f}x" in text


def test_simulate_bad_tile(capsys):
    assert cli.main(["simulate", "--grid", "32", "32", "--window", "9", "--tile", "0", "8"]) == 2
    assert "tile_shape" in capsys.readouterr().err


def test_simulate_pads_a_tile_that_does_not_divide_the_grid(capsys):
    assert cli.main(["simulate", "--grid", "32", "32", "--window", "9", "--tile", "5", "8"]) == 0
    assert f"{simulate((32, 32), window=9, tile_shape=(5, 8)).speedup_upper_bound:.2f}x" in capsys.readouterr().out
