"""Starting a run's loop: the remote trackers open before the output directory is claimed, so that a tracker that
cannot start fails the run while an older run there is still whole."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from easytrain import stop_signals
from easytrain.arguments import TrainingArguments
from easytrain.jobs import outcome_of
from easytrain.reporting import open_trackers

T = TypeVar("T")


def trackers_then_claim(args: TrainingArguments, start_step: int, is_main_process: bool,
                        claim: Callable[[], T]) -> tuple[list[Any], T]:
    """Open the remote trackers (W&B, MLflow; the main process only), then `claim()` the output_dir (remove or
    move an older run's files): a tracker that cannot start (no API key, a store it cannot use) fails the run
    while the older run is still whole; so does a stop signal caught until then, or during the claim once it is done
    (`easytrain.stop_signals`). The trackers are closed if the claim fails."""
    trackers = open_trackers(args.output_dir, args.report_to, start_step, args.to_dict()) if is_main_process else []
    try:
        stop_signals.check("opening the metric trackers")
        claimed = claim()
        stop_signals.check("claiming the output directory")
        return trackers, claimed
    except BaseException as error:
        for tracker in trackers:
            tracker.close(outcome_of(error))
        raise
