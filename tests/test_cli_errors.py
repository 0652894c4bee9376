"""The CLI's error contract (architecture.md §5): a user error is one line on stderr and exit code 2; any other
exception is a bug and keeps its traceback."""

import pytest

from framecast import cli
from framecast import errors as E
from framecast.data.envs import RecordError
from framecast.data.trajectories import PairStoreError
from framecast.stream import SessionError
from framecast.train.loop import RunLockedError


@pytest.mark.parametrize("exc", [E.ConfigError, E.CheckpointError, E.DataError, E.RequestError, RecordError,
                                 PairStoreError, SessionError, RunLockedError])
def test_user_errors_are_one_line_and_exit_2(exc, monkeypatch, capsys):
    assert issubclass(exc, E.UserError)

    def fail(args):
        raise exc("the thing at fault: x.y=3")

    monkeypatch.setattr(cli, "_train", fail)
    assert cli.main(["train"]) == 2
    err = capsys.readouterr().err
    assert err == "framecast: error: the thing at fault: x.y=3\n"


@pytest.mark.parametrize("exc", [ValueError, KeyError, RuntimeError, TypeError])
def test_other_exceptions_are_bugs_with_a_traceback(exc, monkeypatch):
    def bug(args):
        raise exc("internal")

    monkeypatch.setattr(cli, "_train", bug)
    with pytest.raises(exc, match="internal"):
        cli.main(["train"])


def test_a_bad_config_key_from_the_command_line(capsys):
    assert cli.main(["train", "train.stepz=3"]) == 2
    err = capsys.readouterr().err
    assert "train.stepz" in err and err.count("\n") == 1
    assert cli.main(["train", "distill.teacher=x"]) == 2
    assert "distill.teacher -> ode.teacher / cd.teacher" in capsys.readouterr().err
