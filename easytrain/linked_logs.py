"""What a run writes into its logs where they are links to another disk (`metrics.jsonl`, `metrics.csv`,
`tensorboard/` leading to a file or folder there), so that a run failing before its first step takes back that and
nothing else: others may write into the same folder (runs sharing one TensorBoard root), append to the file, or point
the link elsewhere while the run compiles, and what they wrote is theirs (`run_dir.remove_unstarted_logs`,
`held_run.HeldRun`)."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path

logger = logging.getLogger("easytrain")

#: How TensorBoard event files are named (`events.out.tfevents.<time>.<host><suffix>`).
EVENT_FILE_PREFIX = "events.out.tfevents."


@dataclasses.dataclass
class WrittenLog:
    """A log file a sink writes, by its real path (resolved as it opened: through a link, the file on the other disk)
    and what it wrote there. `size`: the file's length while it holds this run's writes alone (the sink counts them
    from an empty file); `created`: the sink made the file under a name of this process's own (TensorBoard's event
    file), so the whole file is the run's."""

    path: Path
    size: int = 0
    created: bool = False


def opened(path: Path, created: bool = False) -> WrittenLog:
    """The record of a sink opening `path` (followed through a link): empty, or made by the sink (`created`)."""
    return WrittenLog(Path(os.path.realpath(path)), created=created)


def own_event_file(name: str) -> bool:
    """Whether `name` in a TensorBoard folder is an event file this process wrote: the TensorBoard sink names its
    file `...<host>.<pid>.<ns>` (`reporting._TensorBoardSink`)."""
    return name.startswith(EVENT_FILE_PREFIX) and name.split(".")[-2:-1] == [str(os.getpid())]


def run_entry(name: str) -> bool:
    """Whether `name` at the top of a run's tensorboard/ is what a run writes there: its event files, the profiler's
    `plugins/` (`process_<i>/` where several processes trace: `profiling.trace_dir`). Another entry of a linked
    folder (another run's folder in a shared TensorBoard root) is never the run's to move or remove."""
    return name.startswith(EVENT_FILE_PREFIX) or name == "plugins" or re.fullmatch(r"process_\d+", name) is not None


def take_back(log: WrittenLog) -> None:
    """Remove what a run wrote in `log` and nothing else: the file it made (`created`), or the bytes it wrote into a
    file it found empty, where the file holds nothing else (its length is what the run wrote); else it is left as
    it is, named in a warning (another wrote there too)."""
    try:
        size = log.path.stat().st_size
    except FileNotFoundError:
        return
    if log.created:
        log.path.unlink()
    elif size != log.size:
        logger.warning("%s holds %d bytes, and this run wrote %d there before it failed: something else wrote there "
                       "too, so it is left as it is (empty it by hand to log there again)", log.path, size, log.size)
    elif size:
        os.truncate(log.path, 0)
