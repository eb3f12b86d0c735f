import subprocess
import sys

import pytest

from lightning_lab.cli import COMMANDS, main


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert f"  {name} " in out


def test_every_command_resolves_to_a_function():
    import importlib

    for name, (target, help_) in COMMANDS.items():
        module_name, function_name = target.split(":")
        assert callable(getattr(importlib.import_module(module_name), function_name)), name
        assert help_ and "\n" not in help_


def test_unknown_command_is_one_line_naming_the_commands():
    result = subprocess.run([sys.executable, "-m", "lightning_lab.cli", "no-such-command"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "unknown command 'no-such-command'" in result.stderr
    assert "pretrain" in result.stderr and "--help" in result.stderr


def test_a_user_error_is_one_line_naming_command_and_subcommand(tmp_path, capsys):
    assert main(["data", "pack", "--tokenizer", str(tmp_path / "tok"), "--input", "x", "--output", "y"]) == 2
    assert capsys.readouterr().err == f"lab data pack: error: --tokenizer {tmp_path / 'tok'}: no such directory\n"
    assert main(["export", "--ckpt", str(tmp_path)]) == 2  # argparse's own usage error, one line too
    assert capsys.readouterr().err == "lab export: error: the following arguments are required: --out\n"


def test_debug_shows_the_traceback_of_a_user_error(tmp_path):
    from lightning_lab.errors import UserError

    with pytest.raises(UserError, match="no such file"):
        main(["--debug", "export", "--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "out")])


def test_an_os_error_on_a_named_file_is_a_user_error_and_any_other_a_bug(monkeypatch, capsys):
    import lightning_lab.callbacks.status as status

    def fail(error):
        def command(argv):
            raise error
        return command

    monkeypatch.setattr(status, "status_main", fail(OSError(28, "No space left on device", "runs/x/heartbeat.json")))
    assert main(["status"]) == 2
    assert capsys.readouterr().err == "lab status: error: runs/x/heartbeat.json: No space left on device\n"
    monkeypatch.setattr(status, "status_main", fail(OSError("no file named: a bug")))
    with pytest.raises(OSError, match="a bug"):
        main(["status"])
