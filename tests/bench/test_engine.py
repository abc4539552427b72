"""`blockattn bench` runs end to end at a tiny size: table, PNG and markdown section."""
from blockattn.cli import main


def test_bench_writes_table_plot_and_record(tmp_path, capsys):
    record, plot = tmp_path / "B.md", tmp_path / "e.png"
    record.write_text("# Benchmarks\n\nkept text\n")
    assert main(["bench", "--lengths", "128", "--families", "causal", "random-10%", "--backends", "torch",
                 "--no-flex", "--repeats", "1", "--record", str(record), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "| causal | 128 | torch | fwd |" in out and "| random-10% | 128 | torch | fwd |" in out
    text = record.read_text()
    assert "kept text" in text and "<!-- bench-engine-fwd -->" in text and "| causal | 128 | torch |" in text
    assert plot.read_bytes()[:4] == b"\x89PNG"
    # a second run replaces the section instead of appending another
    main(["bench", "--lengths", "128", "--families", "causal", "--backends", "torch", "--no-flex", "--repeats", "1",
          "--record", str(record), "--plot", ""])
    assert record.read_text().count("<!-- bench-engine-fwd -->") == 1
