"""docs/custom_trainer.md's collate section: `collate` runs on the loader's reader threads, ahead of the step, so a
collate that records its batches does not see what each step trained on; `count_samples(batch)` does, once per
training step and in step order, with the batch's example ids (the route the page names)."""

import threading


from easytrain import BaseTrainer
from easytrain.data.order import StepRows
from runs import args_for


class Recording(BaseTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.collate_threads: set[str] = set()
        self.collated: list[tuple[int, ...]] = []
        self.trained: list[tuple[int, ...]] = []

    def collate(self, rows, example_ids):
        self.collate_threads.add(threading.current_thread().name)
        self.collated.append(tuple(example_ids))
        return super().collate(rows, example_ids)

    def count_samples(self, batch):
        self.trained.append(tuple(batch["example_id"]))
        return super().count_samples(batch)


def test_count_samples_sees_each_step_s_example_ids_in_order_while_collate_runs_ahead_on_reader_threads(tmp_path):
    trainer = Recording(args_for(tmp_path, max_steps=3))
    trainer.train()
    assert threading.main_thread().name not in trainer.collate_threads
    rows = StepRows(trainer._data.train.num_rows, 4, 4, seed=trainer.arguments.seed, process_index=0)
    assert trainer.trained == [tuple(rows(step)) for step in range(3)]
    assert set(trainer.trained) <= set(trainer.collated)  # and maybe more: those read ahead of the last step
