"""`resume_from_checkpoint='latest'` with a relative output_dir, from another working directory (`--config
<run>/arguments.json` run elsewhere): the refusal says the output_dir was resolved against the working directory,
names it and asks for the run's directory as an absolute path, instead of suggesting 'latest', the value given."""

from __future__ import annotations

from pathlib import Path

import pytest

from easytrain.checkpoint_dirs import CheckpointNotFoundError, resolve_checkpoint


def test_latest_under_a_relative_output_dir_names_the_working_directory(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path / "cwdB"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(CheckpointNotFoundError) as raised:
        resolve_checkpoint("runs/x", "latest")
    message = str(raised.value)
    assert f"no complete checkpoint under {elsewhere / 'runs/x/checkpoints'}" in message, message
    assert f"output_dir 'runs/x' is relative: it was resolved against the working directory {elsewhere}" in message
    assert "give --output_dir as an absolute path" in message and "or 'latest'" not in message, message


def test_latest_under_an_absolute_output_dir_does_not_suggest_latest_again(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError) as raised:
        resolve_checkpoint(tmp_path / "run", "latest")
    message = str(raised.value)
    assert f"no complete checkpoint under {tmp_path / 'run' / 'checkpoints'}" in message
    assert "relative" not in message and "or 'latest'" not in message, message
    assert "leave resume_from_checkpoint unset to start from scratch" in message
