"""How a trainer makes `output_dir` its run's and gives it back (mixed into `BaseTrainer`): the claim is taken once,
after every check of `setup` (`claim.claim_run`), and what it removes or sets aside of an older run is held until the
first step is done (`held_run.HeldRun`), so a run that ends before it leaves the older run as the claim found it.
"""

from __future__ import annotations

from pathlib import Path

from easytrain.trainers.claim import claim_run
from easytrain.trainers.held_run import HeldRun
from easytrain.trainers.loop import TrainLoop


class ClaimHooks:
    """`_claim` (the `trackers_then_claim` callback of `train`) and `_give_back_claim` (a run that failed before its
    first step). Reads the trainer's `_arguments`, `_resume_from`, `is_main_process`, `save_arguments` and
    `loop_parts`."""

    #: Whether this trainer claimed `output_dir` (a later `train()` after a give-back claims again).
    _output_dir_claimed: bool = False
    #: What the claim of output_dir holds of the older run (`held_run.HeldRun`) until the first step is done.
    _held_run: HeldRun | None = None
    #: The trainer's own files in output_dir, written once it is claimed (`save_claimed_outputs`), held with the
    #: older run's: a run ending before its first step leaves those of the run it replaced as they were.
    claimed_outputs: tuple[str, ...] = ()

    def _claim(self, records: dict[Path, bytes | None]) -> TrainLoop:
        """Once per trainer, after every check of `setup`: make `output_dir` this run's (`claim.claim_run`). What
        the claim removes or sets aside is held until the first step is done (`held_run`), and so are the trackers'
        records as they were before the trackers opened (`tracker_records`)."""
        if not self._output_dir_claimed:
            self._held_run = HeldRun(Path(self._arguments.output_dir), records=records)
            claim_run(self._arguments, self._resume_from, self.is_main_process, held=self._held_run,
                      outputs=self.claimed_outputs)
            self._output_dir_claimed = True
        self.save_arguments()
        self.save_claimed_outputs()
        return TrainLoop(self.loop_parts())  # its checkpoint manager reads the claimed directory

    def save_claimed_outputs(self) -> None:
        """Write `claimed_outputs` in the claimed output_dir (none by default)."""

    def _give_back_claim(self) -> None:
        """The run ended before its first step was done (a step too large for the device, a loss that does not
        trace, a stop signal): the older run is put back as the claim found it, and a later `train()` claims
        again. Once the first step is done the claim is settled, and this does nothing."""
        if not self._held_run:
            return
        try:
            self._held_run.give_back()
        finally:  # a later train() claims again, under the lock, whatever is left in place
            self._held_run, self._output_dir_claimed = None, False
