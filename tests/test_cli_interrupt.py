"""Ctrl-C in the commands that read or write models: one line, exit 130, no traceback (fdfast-train's
signals are tested in test_run_safety, fdfast-convert's in test_convert)."""
import pytest

from fdfast.cli import analyze as analyze_cli
from fdfast.cli import eval as eval_cli
from fdfast.cli import export as export_cli


def _interrupted(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("cli, work, argv, says", [
    (eval_cli, "load_subjects", ["run", "--data", "val"], "no result was written"),
    (export_cli, "export_checkpoint", ["run", "--format", "timm", "--out", "out"], "nothing was written"),
    (analyze_cli, "analyze", ["run", "--synthetic", "--out", "out"], "the files already in out are complete"),
])
def test_ctrl_c_is_one_line_and_exit_130(cli, work, argv, says, monkeypatch, capsys):
    monkeypatch.setattr(cli, work, _interrupted)  # Ctrl-C arriving while the command works
    try:
        rc = cli.main(argv)
    except KeyboardInterrupt:  # unhandled, it would also stop pytest itself
        pytest.fail(f"{cli.PROG} let KeyboardInterrupt escape (a traceback for the user)")
    assert rc == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{cli.PROG}: interrupted; ") and says in err[0], err
