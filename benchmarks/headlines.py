"""The headline numbers of each benchmark's JSON: what `benchmarks.run` prints in its table and draws in its chart.

One function per benchmark, named after it, reading the keys that benchmark writes; a missing key gives a
`None` value (shown as "-"), never an error, so a failed or partial benchmark still has its rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Headline:
    """One number of the summary: `ratio`s (dimensionless, 1.0 = parity) are also drawn in the chart."""

    benchmark: str
    label: str
    value: float | None
    low: float | None = None  # spread (min, max over the benchmark's repeats), where it reports one
    high: float | None = None
    ratio: bool = True


def dig(tree: Any, path: str) -> Any:
    """`tree["a"]["b"]...` for the path "a.b...", or None where any key is missing."""
    for key in path.split("."):
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def quotient(a: Any, b: Any, digits: int = 4) -> float | None:
    ok = all(isinstance(x, (int, float)) for x in (a, b)) and b
    return round(a / b, digits) if ok else None


def overhead(r: dict) -> list[Headline]:
    rounds = dig(r, "ratio_trainer_over_loop_per_round") or []
    low, high = (min(rounds), max(rounds)) if rounds else (None, None)
    return [Headline("overhead", "easytrain / hand-written tokens/s", dig(r, "ratio_trainer_over_loop"), low, high),
            Headline("overhead", "easytrain / hand-written compile s", dig(r, "ratio_compile_trainer_over_loop")),
            Headline("overhead", "easytrain / hand-written peak RSS", dig(r, "ratio_peak_rss_trainer_over_loop")),
            Headline("overhead", "easytrain / hand-written RSS added by training",
                     dig(r, "ratio_added_rss_trainer_over_loop")),
            Headline("overhead", "easytrain / hand-written planned device memory",
                     dig(r, "ratio_planned_memory_trainer_over_loop")),
            Headline("overhead", "easytrain tokens/s", dig(r, "trainer_tokens_per_second"), ratio=False)]


def host_overhead(r: dict) -> list[Headline]:
    rounds = dig(r, "ratio_trainer_over_loop_per_round") or []
    low, high = (min(rounds), max(rounds)) if rounds else (None, None)
    return [Headline("host_overhead", "easytrain / hand-written tokens/s, 0.5 ms steps",
                     dig(r, "ratio_trainer_over_loop_paired_median"), low, high),
            Headline("host_overhead", "easytrain host us per step beyond the loop",
                     dig(r, "trainer_extra_us_per_step"), ratio=False)]


def drift(r: dict) -> list[Headline]:
    return [Headline("drift", "step time, fourth / second quarter of a long run",
                     r.get("ratio_fourth_over_second_quarter")),
            Headline("drift", "step time slope per 1000 steps (fraction)", r.get("step_time_slope_per_1000_steps"),
                     ratio=False),
            Headline("drift", "live device MiB growth per 1000 steps", dig(r, "live_array_mib.growth_per_1000_steps"),
                     ratio=False),
            Headline("drift", "RSS MiB growth per 1000 steps", dig(r, "rss_mib.growth_per_1000_steps"), ratio=False)]


def step_breakdown(r: dict) -> list[Headline]:
    rows = [Headline("step_breakdown", "hand-written / trainer step time", dig(r, "ratio_hand_written_over_trainer"))]
    for part in ("grad_norm", "accuracy", "guard"):
        low, high = dig(r, f"part_ms_spread.{part}") or (None, None)
        rows.append(Headline("step_breakdown", f"{part}: ms of the trainer's step", dig(r, f"part_ms.{part}"),
                             low, high, ratio=False))
    return rows + [Headline("step_breakdown", "all three: ms of the trainer's step", dig(r, "extras_ms"), ratio=False),
                   Headline("step_breakdown", "the rest vs hand-written: ms", dig(r, "residual_ms"), ratio=False)]


def paired_speedup(benchmark: str, label: str, r: dict) -> Headline:
    """A `step_forms` comparison's paired median speedup, with the range of its rounds."""
    rounds = dig(r, "speedup_per_round") or []
    low, high = (min(rounds), max(rounds)) if rounds else (None, None)
    return Headline(benchmark, label, dig(r, "speedup_paired_median"), low, high)


def gated(r: dict) -> list[Headline]:
    return [paired_speedup("gated", "rematerialised / as-written activation: step speed", r),
            Headline("gated", "as-written / rematerialised: scratch", quotient(dig(r, "scratch_mib.as_written"),
                                                                              dig(r, "scratch_mib.rematerialised")))]


def maxima(r: dict) -> list[Headline]:
    return [paired_speedup("maxima", "shift_max / jnp.max shifts: step speed", r),
            Headline("maxima", "jnp.max / shift_max: one logits-sized reduction", quotient(
                dig(r, "reduction_ms.jnp_max"), dig(r, "reduction_ms.shift_max")))]


def weight_gradients(r: dict) -> list[Headline]:
    down = next((p for p in dig(r, "products_ms") or [] if p["shape"][1] > p["shape"][2]), {})
    return [paired_speedup("weight_gradients", "x^T written out / plain weight gradients: step speed", r),
            Headline("weight_gradients", "plain / x^T written out: the down projection's weight gradient",
                     down.get("plain_over_transposed"))]


def versus_torch(r: dict) -> list[Headline]:
    def side(name: str) -> Headline:
        c = dig(r, f"contenders.{name}") or {}
        return Headline("versus_torch", f"{name} tokens/s", c.get("tokens_per_second"), c.get("min"), c.get("max"),
                        ratio=False)

    per_round = dig(r, "round_ratios.easytrain_over_hf_trainer") or []
    spread = (min(per_round), max(per_round)) if per_round else (None, None)
    return [Headline("versus_torch", "easytrain / HF Trainer tokens/s", dig(r, "ratios.easytrain_over_hf_trainer"),
                     *spread),
            Headline("versus_torch", "easytrain / PyTorch loop tokens/s", dig(r, "ratios.easytrain_over_torch_loop")),
            *(side(name) for name in ("easytrain", "hf_trainer", "torch_loop", "nnx_step")),
            Headline("versus_torch", "easytrain CPU MFU", dig(r, "contenders.easytrain.cpu_mfu"), ratio=False)]


def xla_cpu(r: dict) -> list[Headline]:
    return [Headline("xla_cpu", "JAX / PyTorch step time, one process", dig(r, "phases.ms.step.jax_over_torch")),
            Headline("xla_cpu", "JAX / PyTorch AdamW update time", dig(r, "phases.ms.adamw.jax_over_torch")),
            *(Headline("xla_cpu", f"XLA flags {name} / default tokens/s", dig(r, f"flags.{name}.over_default"))
              for name in (dig(r, "flags") or {}) if name != "default")]


def generation(r: dict) -> list[Headline]:
    return [Headline("generation", "KV cache / no cache tokens/s", dig(r, "speedup")),
            Headline("generation", "KV cache new tokens/s", dig(r, "cache_tokens_per_second"), ratio=False)]


def scaling(r: dict) -> list[Headline]:
    def label(m: dict) -> str:
        return "constrained / plain step, mesh " + ",".join(str(m.get(k, "?")) for k in ("data", "fsdp", "tensor"))
    return [Headline("scaling", label(dig(m, "mesh") or {}),
                     quotient(dig(m, "constrained.step_seconds"), dig(m, "plain.step_seconds")))
            for m in dig(r, "meshes") or [{}]]


def sft(r: dict) -> list[Headline]:
    s = dig(r, "speedup_supervised_tokens_per_second") or {}
    return [Headline("sft", "packing / padding supervised tokens/s", s.get("median_ratio"),
                     s.get("per_repeat_min"), s.get("per_repeat_max"))]


def dpo(r: dict) -> list[Headline]:
    def step(side: str, label: str) -> Headline:  # process CPU seconds: steadier than wall on shared cores
        ratio = dig(r, f"cpu_ratio_over_sft.{side}") or {}
        return Headline("dpo", label, ratio.get("of_medians"), dig(ratio, "per_repeat.min"),
                        dig(ratio, "per_repeat.max"))
    return [step("dpo_frozen", "DPO (frozen ref) / SFT step CPU time"),
            step("dpo_adapter_off_lora", "DPO (LoRA, adapter-off ref) / SFT step CPU time"),
            Headline("dpo", "DPO (frozen ref) / SFT state bytes", quotient(
                dig(r, "memory.state_bytes.dpo_frozen.total"), dig(r, "memory.state_bytes.sft.total")))]


def lora(r: dict) -> list[Headline]:
    ratio = dig(r, "lora_over_full") or {}
    return [Headline("lora", "LoRA / full step time", ratio.get("step_seconds_of_medians"),
                     dig(ratio, "step_seconds_per_round.min"), dig(ratio, "step_seconds_per_round.max")),
            Headline("lora", "LoRA / full optimizer bytes", ratio.get("opt_state_bytes")),
            Headline("lora", "LoRA / full peak RSS", ratio.get("peak_rss"))]


def qlora(r: dict) -> list[Headline]:
    return [Headline("qlora", "NF4 / float32 projection bytes (packed)",
                     dig(r, "base_bytes_over_float.qwix_qlora_nf4.packed_bytes")),
            Headline("qlora", "int8 / float32 projection bytes (held)",
                     dig(r, "base_bytes_over_float.qwix_qlora_int8.on_device_bytes")),
            Headline("qlora", "NF4 QLoRA / LoRA eval loss", quotient(
                dig(r, "sides.qwix_qlora_nf4.eval_loss"), dig(r, "sides.easytrain_lora.eval_loss")))]


def checkpoint(r: dict) -> list[Headline]:
    return [Headline("checkpoint", "async save: loop blocked / sync save", r.get("blocked_over_sync")),
            Headline("checkpoint", "peak RSS added by a save / state bytes", dig(r, "peak_added_over_state.async"))]


def data(r: dict) -> list[Headline]:
    resume = list((r.get("resume_first_batch_seconds") or {}).values())
    return [Headline("data", "tokenise + pack / training tokens/s", r.get("prepare_over_train")),
            Headline("data", "batching / training tokens/s", r.get("batch_over_train")),
            Headline("data", "resume to first batch: step 10M / step 0", quotient(resume[-1], resume[0])
                     if len(resume) > 1 else None)]


def remat(r: dict) -> list[Headline]:
    return [Headline("remat", f"remat {policy} / none: step temp bytes", dig(r, f"policies.{policy}.temp_over_none"))
            for policy in ("full", "dots")] + [
        Headline("remat", f"remat {policy} / none: step time", dig(r, f"policies.{policy}.time_over_none"))
        for policy in ("full", "dots")]


def attention(r: dict) -> list[Headline]:
    longest = (r.get("lengths") or [{}])[-1]
    at = f"xla at T={longest.get('length', '?')}"
    ratios = longest.get("over_xla", {})
    label = f"dot_product_attention / {at} ({r.get('kernel', '?')} kernel)"
    lines = [Headline("attention", f"{label}: step time", dig(ratios, "dot_product_attention.time")),
             Headline("attention", f"{label}: step temp bytes", dig(ratios, "dot_product_attention.temp"))]
    if "splash" in ratios:  # off TPU the kernel is interpreted: only its memory means anything there
        lines.append(Headline("attention", f"splash / {at}: step temp bytes", dig(ratios, "splash.temp")))
    return lines


def chunked_ce(r: dict) -> list[Headline]:
    chunks = [c for c in (r.get("chunks") or {}) if c != "0"] or ["?"]
    return [Headline("chunked_ce", f"loss chunk {c} / full logits: step temp bytes",
                     dig(r, f"chunks.{c}.temp_over_full")) for c in chunks] + [
        Headline("chunked_ce", f"loss chunk {c} / full logits: step time", dig(r, f"chunks.{c}.time_over_full"))
        for c in chunks]


def scan(r: dict) -> list[Headline]:
    deepest = max((dig(r, "depths") or {"?": None}), key=lambda d: int(d) if d.isdigit() else 0)
    ratio = dig(r, f"depths.{deepest}.scan_over_unrolled") or {}
    return [Headline("scan", f"scan / unrolled layers: first-step compile, depth {deepest}",
                     ratio.get("first_step_compile")),
            Headline("scan", f"scan / unrolled layers: initialisation compile, depth {deepest}",
                     ratio.get("init_compile")),
            Headline("scan", f"scan / unrolled layers: step time, depth {deepest}", ratio.get("step_time")),
            Headline("scan", f"scan / unrolled layers: step temp bytes, depth {deepest}", ratio.get("temp"))]


def init_compile(r: dict) -> list[Headline]:
    per_layer = dig(r, "compile_seconds_per_layer.draws")
    return [Headline("init_compile", "initialisation compile: share spent on random numbers",
                     dig(r, "random_share_of_compile"), ratio=False),
            Headline("init_compile", "initialisation compile: seconds per layer",
                     round(per_layer, 3) if isinstance(per_layer, float) else None, ratio=False),
            Headline("init_compile", "initialisation compile: layers built stacked / one at a time",
                     dig(r, "stacked_over_draws")),
            Headline("init_compile", "fresh unrolled train state: built stacked, then laid out / one program (s)",
                     dig(r, "fresh_state.stacked_then_layout_over_one_program.seconds")),
            Headline("init_compile", "frozen EMA builder, unrolled: drawn stacked, then unstacked / one by one (s)",
                     dig(r, "fresh_state.frozen_builder_stacked_over_frozen_builder.seconds"))]


def compile_cache(r: dict) -> list[Headline]:
    return [Headline("compile_cache", "warm / no persistent cache: first-step compile", r.get("warm_over_off")),
            Headline("compile_cache", "cold / no persistent cache: first-step compile", r.get("cold_over_off"))]


def easydel_peer(r: dict) -> list[Headline]:
    if r.get("error"):  # no EasyDeL environment, or EasyDeL failed: recorded, shown, not a crash
        return [Headline("easydel_peer", f"error: {str(r['error']).splitlines()[0][:100]}", None, ratio=False)]
    ratios = [x for x in r.get("per_repeat_ratio") or [] if isinstance(x, (int, float))]
    return [Headline("easydel_peer", "easytrain / EasyDeL trainer tokens/s", r.get("ratio_easytrain_over_easydel"),
                     min(ratios, default=None), max(ratios, default=None)),
            Headline("easydel_peer", "EasyDeL tokens/s", r.get("tokens_per_second"), ratio=False)]
