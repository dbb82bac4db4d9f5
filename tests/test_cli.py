"""The demo command writes viewable outputs and a summary; bad prompts give a clear error."""
from quantsparse_core.cli import main


def test_demo_writes_animation_strip_and_table(tmp_path, capsys):
    rc = main(["demo", "--steps", "3", "--seed", "5", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    for name in ("demo.png", "demo_strip.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert b"acTL" in (tmp_path / "demo.png").read_bytes()  # animated
    assert "analyser found" in out and "a red circle moving right slowly" in out


def test_demo_rejects_words_outside_the_vocabulary(tmp_path, capsys):
    rc = main(["demo", "--prompt", "a purple dragon flying", "--steps", "1", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "'purple' is not in the tiny model's vocabulary" in err
    assert not list(tmp_path.iterdir())  # nothing written
