"""The host memory a checkpoint leaves behind goes back to the system: `easytrain.heap` trims glibc's arenas,
and the training loop does so once after each save is complete, never while one is being written."""

import ctypes
import threading

import pytest

from easytrain import BaseTrainer, TrainingArguments, heap

glibc = pytest.mark.skipif(heap._glibc() is None, reason="malloc_trim is glibc's")


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:"))


@glibc
def test_memory_a_thread_freed_inside_its_arena_goes_back_to_the_system():
    """200 MiB in 64 KiB blocks from a thread's own arena, all freed but the last (so the arena's top stays in
    use and `free` returns nothing): resident until the trim."""
    libc = heap._glibc()
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    kept = []

    def allocate_and_free():
        blocks = [libc.malloc(64 * 1024) for _ in range(3200)]
        for block in blocks:
            ctypes.memset(block, 1, 64 * 1024)
        for block in blocks[:-1]:
            libc.free(block)
        kept.append(blocks[-1])

    before = rss_mib()
    thread = threading.Thread(target=allocate_and_free)
    thread.start()
    thread.join()
    freed_but_resident = rss_mib() - before
    assert heap.release_free_memory()
    assert freed_but_resident > 150 and rss_mib() - before < 50
    libc.free(kept[0])


def test_one_trim_after_saves_complete_none_while_one_is_in_flight():
    trims = []
    trimmer = heap.TrimAfterSaves(trim=lambda: trims.append(True))
    trimmer.check(saving=False)
    assert trims == []  # no save yet
    trimmer.saved()
    trimmer.check(saving=True)
    assert trims == []
    trimmer.saved()  # a second save before the first was trimmed after
    trimmer.check(saving=False)
    trimmer.check(saving=False)
    assert trims == [True]


def test_the_loop_trims_after_its_saves_only_once_they_are_written(tmp_path, monkeypatch):
    seen = []

    class Recorded(BaseTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            monkeypatch.setattr(heap, "release_free_memory",
                                lambda: seen.append(self.loop.manager.is_saving()))

    args = TrainingArguments(output_dir=str(tmp_path), max_length=32, train_batch_size=8, max_steps=30,
                             logging_steps=5, eval_strategy="no", save_strategy="steps", save_steps=10,
                             async_checkpointing=True, report_to=["none"], disable_progress_bar=True,
                             save_pretrained_at_end=False, max_train_samples=64)
    trainer = Recorded(args)
    trainer.train()
    # Saves at steps 10, 20 and 30; each is trimmed after at the first log it is written by (or, for the last,
    # as the loop ends), two saves written between two logs once.
    assert 1 <= len(seen) <= 3 and not any(seen)
    assert not trainer.loop.heap.pending
