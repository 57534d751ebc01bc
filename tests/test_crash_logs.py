"""A run that fails mid-training still logs the steps it trained whose logs were due: the record of a logging
step is written after the next step is dispatched, so a failure in between would otherwise lose it (the last
losses before a crash are the ones a user reads first). A resume truncates records past its checkpoint, so
they are never logged twice."""

import pytest

from easytrain import BaseTrainer
from runs import FailAt, logged
from test_trainer import tiny_args


@pytest.mark.parametrize("logging_steps, fail_at, expected", [(1, 2, [1, 2]), (2, 4, [2, 4]), (2, 5, [2, 4]),
                                                                (2, 3, [2])])
def test_a_run_failing_after_a_logging_step_keeps_that_steps_log(tmp_path, logging_steps, fail_at, expected):
    args = tiny_args(tmp_path, max_steps=8, logging_steps=logging_steps, eval_strategy="no", save_strategy="no")
    with pytest.raises(RuntimeError, match=f"a failing callback at step {fail_at}"):
        BaseTrainer(args, callbacks=[FailAt(fail_at)]).train()
    assert sorted(logged(args.output_dir)) == expected
