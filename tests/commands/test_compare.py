"""`blockattn compare` on small random q/k/v: table, plots, Pareto front, bad arguments."""
import random

from blockattn import cli
from blockattn.commands.compare import pareto_front


def test_pareto_front_matches_brute_force():
    rng = random.Random(0)
    for _ in range(50):
        points = [(rng.random(), rng.random()) for _ in range(rng.randint(1, 12))]
        dominated = {i for i, (x, y) in enumerate(points)
                     if any(x2 <= x and y2 >= y and (x2, y2) != (x, y) for x2, y2 in points)}
        assert set(pareto_front(points)) == set(range(len(points))) - dominated


def test_compare_random_writes_plots_and_table(tmp_path, capsys):
    prefix = str(tmp_path / "cmp")
    assert cli.main(["compare", "--random", "--lengths", "512", "--methods", "xattention", "sale", "vmoba",
                     "--repeats", "1", "-o", prefix]) == 0
    out = capsys.readouterr().out
    assert "| xattention | 512 |" in out and "| sale | 512 |" in out and "skipped vmoba @ 512" in out
    for suffix in ("_recall.png", "_speed.png", ".md"):
        assert (tmp_path / f"cmp{suffix}").stat().st_size > 0


def test_compare_unknown_method(tmp_path, capsys):
    assert cli.main(["compare", "--random", "--methods", "nope", "-o", str(tmp_path / "x")]) == 2
    assert "unknown methods" in capsys.readouterr().err
