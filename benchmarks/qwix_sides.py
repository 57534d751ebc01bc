"""qwix's LoRA and QLoRA on easytrain's Llama, for `benchmarks/qlora.py`: the sides' providers, applying
them, reading their adapters and dequantised kernels back, merging, and what the qwix path does with the rest
of easytrain (`compat_checks`).

Needs `qwix` (`pip install qwix==0.1.8 -c constraints.txt`).
"""

from __future__ import annotations

import argparse
import contextlib
import warnings
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax import nnx

import qwix
from qwix._src.providers import ptq as qwix_ptq

from easytrain import lora
from easytrain.models.llama import init_model

#: weight_qtype and whether the side uses `--tile_size` (4-bit sides: one scale per tile of inputs).
QTYPES: dict[str, tuple[Any, bool]] = {"qwix_lora": (None, False), "qwix_qlora_int8": (jnp.int8, False),
                                       "qwix_qlora_int4": (jnp.int4, True), "qwix_qlora_nf4": ("nf4", True)}
#: qwix module paths (`/`-joined) of the seven projections, the same layers easytrain's default targets.
PROJECTIONS = r"layers/\d+/(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)"
QWIX_PATCH = ("qwix 0.1.8 ptq.WithAux.astype rebuilds its array with flax_util.update_boxed, which raises "
              "'Unsupported type: QArray' once the kernel is quantised; easytrain's Dense calls "
              "kernel[...].astype(dtype), so every call after the first fails. Patched here to "
              "WithAux.replace(array=unbox(array).astype(dtype)).")


def withaux_astype(self: Any, dtype: Any) -> Any:
    return self.replace(array=qwix_ptq.flax_util.unbox(self.array).astype(dtype))


@contextlib.contextmanager
def qwix_astype_patch() -> Iterator[None]:
    """Inside the block qwix's `WithAux.astype` works on a quantised kernel (see `QWIX_PATCH`)."""
    original = qwix_ptq.WithAux.astype
    qwix_ptq.WithAux.astype = withaux_astype
    try:
        yield
    finally:
        qwix_ptq.WithAux.astype = original


def qwix_provider(options: argparse.Namespace, side: str, **rule: Any) -> qwix.LoraProvider:
    """The `LoraProvider` of `side`; `rule` adds or overrides `LoraRule` fields (dropout, tile_size)."""
    qtype, tiled = QTYPES[side]
    rule = {"tile_size": options.tile_size if tiled else None, **rule}
    return qwix.LoraProvider(module_path=PROJECTIONS, rank=options.rank, alpha=options.alpha, weight_qtype=qtype,
                             **rule)


def apply_qwix(base: nnx.Module, provider: qwix.LoraProvider, example_ids: jax.Array, seed: int) -> nnx.Module:
    """`qwix.apply_lora_to_model` on a copy of `base` (qwix clones it), quiet about qwix's own warnings.

    Run under `nnx.jit`: qwix initialises an NNX model by calling it once (quantising each kernel and drawing
    the adapters as its `dot_general`s run), which eagerly compiles every op one by one; traced, it is one
    compilation, and the returned state is the same.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nnx.jit(lambda model, ids: qwix.apply_lora_to_model(model, provider, ids, rngs=nnx.Rngs(seed)))(
            base, example_ids)


def adapted_modules(model: nnx.Module) -> dict[tuple, nnx.Module]:
    """Module path -> module, for every module holding adapters (easytrain's `lora_a` or qwix's `kernel_lora_a`)."""
    return {tuple(path): node for path, node in nnx.iter_modules(model)
            if hasattr(node, "lora_a") or hasattr(node, "kernel_lora_a")}


def adapter_pair(module: nnx.Module) -> tuple[jax.Array, jax.Array]:
    if hasattr(module, "lora_a"):
        return module.lora_a[...], module.lora_b[...]
    return module.kernel_lora_a[...], module.kernel_lora_b[...]


def raw(tree: Any) -> Any:
    """`tree` with every `nnx.Variable` replaced by its value."""
    return jax.tree.map(lambda v: v[...], tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def dequantised_kernel(module: nnx.Module) -> jax.Array:
    """The float kernel a module computes with: qwix's quantised kernel dequantised, or the plain one."""
    kernel = module.kernel
    if isinstance(kernel, qwix_ptq.WithAux):
        return qwix.dequantize(raw(kernel.array)).astype(jnp.float32)
    return kernel[...].astype(jnp.float32)


def merged_float_model(float_base: nnx.Module, adapted: nnx.Module, scaling: float,
                       on_dequantised: bool) -> nnx.Module:
    """A plain float model: each adapted kernel becomes `kernel + scaling * A @ B`, with `kernel` the float
    base's own (`on_dequantised=False`) or the adapted model's dequantised one."""
    merged = nnx.clone(float_base)
    targets = dict(nnx.iter_modules(merged))
    for path, module in adapted_modules(adapted).items():
        a, b = adapter_pair(module)
        kernel = dequantised_kernel(module) if on_dequantised else targets[path].kernel[...]
        delta = jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
        targets[path].kernel[...] = (kernel + scaling * delta).astype(targets[path].kernel.dtype)
    return merged




def compat_checks(options: argparse.Namespace) -> dict[str, Any]:
    """What the qwix path does with the rest of easytrain, on a tiny model (int8 base, nonzero adapters)."""
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    base = init_model(config, seed=options.seed)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 8)), jnp.int32)
    out: dict[str, Any] = {}

    def nonzero_b(model: nnx.Module) -> nnx.Module:
        for module in adapted_modules(model).values():
            module.kernel_lora_b[...] = jnp.full(module.kernel_lora_b.shape, 0.05, module.kernel_lora_b.dtype)
        return model

    # 1. Unpatched qwix: the second call of a quantised model.
    model = apply_qwix(base, qwix_provider(options, "qwix_qlora_int8"), ids, options.seed)
    try:
        model(ids)
        out["unpatched_second_call_error"] = None
    except Exception as error:  # noqa: BLE001  (what qwix raises is the finding)
        out["unpatched_second_call_error"] = f"{type(error).__name__}: {error}"[:200]
    with qwix_astype_patch():
        model = nonzero_b(apply_qwix(base, qwix_provider(options, "qwix_qlora_int8"), ids, options.seed))
        full = model(ids)
        # 2. decode (what generate() calls): not intercepted by qwix (one method per NNX model).
        try:
            logits, _ = model.decode(ids, model.init_cache(2, 16))
            out["decode_error"] = None
            out["decode_vs_call_max_abs_diff"] = float(jnp.max(jnp.abs(logits - full)))
        except Exception as error:  # noqa: BLE001
            out["decode_error"] = f"{type(error).__name__}: {error}"[:200]
        # 3. LoRA dropout: needs qwix_rngs set by hand, and ignores model.eval().
        dropout = apply_qwix(base, qwix_provider(options, "qwix_qlora_int8", dropout=0.5), ids, options.seed)
        dropout = nonzero_b(dropout)
        try:
            dropout(ids)
            out["dropout_without_qwix_rngs_error"] = None
        except Exception as error:  # noqa: BLE001
            out["dropout_without_qwix_rngs_error"] = f"{type(error).__name__}: {error}"[:200]
        dropout.set_attributes(qwix_rngs=nnx.Rngs(dropout=options.seed))
        dropout.eval()
        out["dropout_eval_mode_two_calls_max_abs_diff"] = float(jnp.max(jnp.abs(dropout(ids) - dropout(ids))))
        # 4. easytrain's LoRA tooling does not see qwix adapters.
        out["easytrain_lora_modules_found"] = len(lora.lora_modules(model))
        merged = lora.merge_lora(model)
        out["merge_lora_still_has_qwix_adapters"] = bool(adapted_modules(merged))
        with lora.adapters_disabled(model):  # DPO's adapter-off reference
            out["adapters_disabled_max_abs_logit_change"] = float(jnp.max(jnp.abs(model(ids) - full)))
        # 5. The base fingerprint (checked on resume) of a 4-bit base.
        model4 = apply_qwix(base, qwix_provider(options, "qwix_qlora_nf4", tile_size=None), ids, options.seed)
        try:
            lora.base_fingerprint(model4)
            out["base_fingerprint_4bit_error"] = None
        except Exception as error:  # noqa: BLE001
            out["base_fingerprint_4bit_error"] = f"{type(error).__name__}: {error}"[:160]
        # 6. the quantised kernel cannot take a gradient (integer arrays), so it must stay out of `trainable`.
        try:
            nnx.grad(lambda m: m(ids).sum(), argnums=nnx.DiffState(0, nnx.Param))(model)
            out["grad_wrt_all_params_error"] = None
        except Exception as error:  # noqa: BLE001
            out["grad_wrt_all_params_error"] = f"{type(error).__name__}: {error}"[:120]
        # 7. A bfloat16 base gives bfloat16 adapters (LoraRule has no adapter dtype).
        base16 = init_model(config, seed=options.seed, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
        model16 = apply_qwix(base16, qwix_provider(options, "qwix_qlora_int8"), ids, options.seed)
        out["bfloat16_base_adapter_dtype"] = str(next(iter(adapted_modules(model16).values())).kernel_lora_a.dtype)
    return out
