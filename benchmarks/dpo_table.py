"""The table `python -m benchmarks.dpo` prints: step time and memory of each side, then the log-prob passes' scratch."""

from __future__ import annotations

from typing import Any


def _mib(value: int | None) -> str:
    return "null" if value is None else f"{value / 2**20:.2f}"


def print_table(result: dict[str, Any]) -> None:
    kinds = list(result["step_seconds"])
    rows = [("", *kinds)]
    for unit, seconds, key in (("wall", "step_seconds", "ratio_over_sft"),
                               ("CPU", "step_cpu_seconds", "cpu_ratio_over_sft")):
        ratios = result[key]
        rows.append((f"{unit} s/step (median [min, max])", *(f"{s['median']} [{s['min']}, {s['max']}]"
                                                             for s in result[seconds].values())))
        rows.append((f"{unit} ratio over SFT (of medians)", "1", *(str(ratios[k]["of_medians"]) for k in kinds[1:])))
        rows.append((f"{unit} ratio over SFT (of minimums)", "1", *(str(ratios[k]["of_minimums"]) for k in kinds[1:])))
        rows.append((f"{unit} ratio per repeat (median [min, max])", "1",
                     *(f"{ratios[k]['per_repeat']['median']} [{ratios[k]['per_repeat']['min']}, "
                       f"{ratios[k]['per_repeat']['max']}]" for k in kinds[1:])))
    rows.append(("first step s (compile)", *(str(result["first_step_seconds"][k]) for k in kinds)))
    memory = result["memory"]
    rows.append(("train state MiB", *(_mib(memory["state_bytes"][k]["total"]) for k in kinds)))
    rows.append(("  of which frozen MiB", *(_mib(memory["state_bytes"][k]["frozen"]) for k in kinds)))
    rows.append(("  of which LoRA base MiB", *(_mib(memory["state_bytes"][k]["base"]) for k in kinds)))
    rows.append(("  of which optimizer MiB", *(_mib(memory["state_bytes"][k]["opt_state"]) for k in kinds)))
    rows.append(("live MiB added by setup", *(_mib(memory["live_bytes_added_by_setup"][k]) for k in kinds)))
    for key in ("argument", "output", "alias", "temp", "step_peak_estimate"):
        rows.append((f"step {key} MiB", *(_mib((memory["train_step"][k] or {}).get(key)) for k in kinds)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
    naive = memory["train_step"]["dpo_frozen_naive_logps"]
    if naive:
        print(f"dpo_frozen step with a naive log_softmax: temp {_mib(naive['temp'])} MiB "
              f"(chunked token_logps: {_mib(memory['train_step']['dpo_frozen']['temp'])} MiB)")
    if memory["device_peak_note"]:
        print(f"device peak: null. {memory['device_peak_note']}")
    logps = result["logps_memory"]
    print(f"log-prob temp MiB at {'x'.join(map(str, logps['shape_BTV']))} (chunk {logps['chunk_size']}): "
          "chunked token_logps vs log_softmax + gather")
    for dtype in ("bfloat16", "float32"):
        for pass_name, entry in logps[dtype].items():
            if not isinstance(entry, dict):  # the logits' own size
                continue
            print(f"  {dtype:8} {pass_name:14} {_mib(entry['chunked_temp_bytes']):>9} vs "
                  f"{_mib(entry['naive_temp_bytes']):>9}  ({entry['naive_over_chunked']}x)")
