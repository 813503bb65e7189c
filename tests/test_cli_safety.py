"""The CLI's last-resort handler, warnings instead of silence, readable losses, partial-file names."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import pytest

from sf_core.cli import main
from sf_core.errors import SelfForcingError


def test_unexpected_failure_prints_one_line_and_writes_the_traceback(tmp_path, monkeypatch, capsys):
    import sf_core.cli as cli

    def boom(args):
        raise TypeError("an internal mistake")

    real = cli.build_parser

    def parser():
        p = real()
        p._subparsers._group_actions[0].choices["inspect"].set_defaults(func=boom)
        return p

    monkeypatch.setattr(cli, "build_parser", parser)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    assert main(["inspect", "x"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unexpected TypeError: an internal mistake" in err[0]
    path = Path(re.search(r"full traceback in (\S+)", err[0]).group(1))
    assert path.parent == tmp_path and "Traceback" in path.read_text() and "boom" in path.read_text()


def test_usage_errors_return_2_instead_of_exiting(capsys):
    assert main(["generate", "--model"]) == 2
    assert main(["no-such-command"]) == 2


def test_long_prompts_are_truncated_with_a_warning(caplog):
    from sf_core.text.tokenizer import Tokenizer

    tok = Tokenizer(lambda text: [5] * len(text.split()), vocab_size=10)
    with caplog.at_level(logging.WARNING, logger="sf_core"):
        ids, mask = tok(["short one", "w " * 600], length=512)
    assert int(mask[1].sum()) == 512 and int(mask[0].sum()) == 3
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "600 tokens" in msgs[0] and "first 511" in msgs[0]


def test_timeline_entries_after_the_end_are_reported(monkeypatch, caplog):
    import sf_core.generate as gen
    from sf_core.cli import build_parser

    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop

    monkeypatch.setattr(gen.pf, "dit_config", stop)  # everything before the model files
    monkeypatch.setattr(gen, "check_paths", lambda *a, **k: None)
    args = build_parser().parse_args(["generate", "--model", "m", "--text-encoder", "t", "--vae", "v", "-o", "o.mp4",
                                      "--frames", "21", "--device", "cpu",
                                      "--prompt", "0s: a fox\n1s: a cat\n30s: a dog"])
    with caplog.at_level(logging.WARNING, logger="sf_core"), pytest.raises(Stop):
        gen.preflight(args)
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "'a dog'" in msgs[0] and "not used" in msgs[0]


def test_progress_lines_keep_small_losses_visible():
    from sf_core.train.cli import progress_line

    line = progress_line({"iteration": 3, "generator_loss": 1.234567e-9, "critic_loss": 0.5, "seconds": 1.23456})
    assert "1.2346e-09" in line and "5.0000e-01" in line
    assert json.loads(line) == {"iteration": 3, "generator_loss": 1.2346e-9, "critic_loss": 0.5, "seconds": 1.235}


def test_partial_files_are_named_apart_from_results_and_only_dead_ones_are_stale(tmp_path):
    from sf_core.paths import create_partial, same_file, stale_partials

    target = tmp_path / "v.mp4"
    mine = create_partial(target)
    assert mine.name.startswith(".v.mp4.") and mine.name.endswith(".partial.mp4") and not same_file(mine, target)
    (tmp_path / ".v.mp4.abcd1234.partial.mp4").write_bytes(b"")  # older naming, no writer known: stale
    (tmp_path / ".w.mp4.1-ab.partial.mp4").write_bytes(b"")  # another output's
    assert [p.name for p in stale_partials(target)] == [".v.mp4.abcd1234.partial.mp4"]


def test_same_file_sees_links_and_relative_names(tmp_path, monkeypatch):
    from sf_core.paths import same_file

    (tmp_path / "a").write_bytes(b"x")
    os.link(tmp_path / "a", tmp_path / "b")
    os.symlink(tmp_path / "a", tmp_path / "c")
    monkeypatch.chdir(tmp_path)
    assert same_file("b", tmp_path / "a") and same_file("c", "a") and same_file("./new", tmp_path / "new")
    assert not same_file("a", "new")


def test_interrupted_is_raised_by_the_second_signal_only_when_deferred():
    import signal

    from sf_core.signals import Interrupted, StopSignals

    with StopSignals(defer=True) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.name == "SIGTERM"
        with pytest.raises(Interrupted) as e:
            os.kill(os.getpid(), signal.SIGINT)
        assert e.value.exit_code == 130
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_selfforcingerror_is_the_user_error_base():
    from sf_core.cli import USER_ERRORS

    assert issubclass(SelfForcingError, USER_ERRORS) and issubclass(PermissionError, USER_ERRORS)
