"""RoPE as a Hugging Face config describes it: the base `rope_theta` and, for long-context checkpoints, a scaling
of the rotary frequencies (`rope_parameters['rope_type']`).

Scaling changes only the inverse frequencies (and, for YaRN, a factor on the cos/sin tables), never how they are
applied, so it is computed once on the host from the config (`RopeScaling.inverse_frequencies`) and the traced
tables stay as they are. The formulas are those of the papers and reference code each type names, as
`transformers.modeling_rope_utils` computes them (in float32), so that Llama 3.1/3.2 (`llama3`), linearly
interpolated (`linear`) and YaRN-extended (`yarn`, e.g. Qwen2.5/Qwen3 long-context) checkpoints give the logits
transformers gives. Types whose frequencies depend on the sequence seen at run time (`dynamic`, `longrope`) are
refused by name (`families.rope_scaling` checks a config's parameters).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

#: The scaled RoPE types implemented, and the `rope_parameters` keys each needs.
REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("original_max_position_embeddings",),
}
#: The keys each type reads besides the required ones (all others are ignored, as transformers ignores them).
OPTIONAL_KEYS: dict[str, tuple[str, ...]] = {
    "linear": (),
    "llama3": (),
    "yarn": ("factor", "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"),
}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """A scaled RoPE: its type and the `rope_parameters` it reads, as a hashable (static) model attribute.

    Attributes:
        rope_type: one of `REQUIRED_KEYS`.
        parameters: `(key, value)` pairs the type reads, sorted by key.
        max_position_embeddings: the config's where YaRN's `factor` is derived from it (none given), else None: the
            scaling is a static model attribute, and a context length no frequency reads must not tell two
            programs apart.
    """

    rope_type: str
    parameters: tuple[tuple[str, Any], ...]
    max_position_embeddings: int | None = None

    def value(self, key: str, default: Any = None) -> Any:
        return dict(self.parameters).get(key, default)

    def inverse_frequencies(self, head_dim: int, theta: float) -> np.ndarray:
        """The scaled inverse frequencies `[head_dim // 2]` (float32)."""
        unscaled = inverse_frequencies(head_dim, theta)
        if self.rope_type == "linear":
            return (unscaled / np.float32(self.value("factor"))).astype(np.float32)
        if self.rope_type == "llama3":
            return llama3_frequencies(unscaled, self.value("factor"), self.value("low_freq_factor"),
                                      self.value("high_freq_factor"), self.value("original_max_position_embeddings"))
        return yarn_frequencies(head_dim, theta, self.yarn_factor(), self.value("original_max_position_embeddings"),
                                beta_fast=self.value("beta_fast") or 32, beta_slow=self.value("beta_slow") or 1,
                                truncate=self.value("truncate", True))

    def yarn_factor(self) -> float:
        """YaRN's context factor: as given, else the config's context over the original one."""
        factor = self.value("factor")
        return factor if factor is not None else self.max_position_embeddings / self.value(
            "original_max_position_embeddings")

    @property
    def attention_factor(self) -> float:
        """What the cos/sin tables are multiplied by: 1 except under YaRN (its 'mscale')."""
        if self.rope_type != "yarn":
            return 1.0
        if (given := self.value("attention_factor")) is not None:
            return float(given)
        factor, mscale, mscale_all_dim = self.yarn_factor(), self.value("mscale"), self.value("mscale_all_dim")
        if mscale and mscale_all_dim:
            return float(yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim))
        return yarn_mscale(factor)


def inverse_frequencies(head_dim: int, theta: float) -> np.ndarray:
    """Unscaled RoPE inverse frequencies `theta ** (-2i / head_dim)` in float32, as transformers computes them."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(np.float32)


def llama3_frequencies(inv_freq: np.ndarray, factor: float, low_freq_factor: float, high_freq_factor: float,
                       original_context: int) -> np.ndarray:
    """Llama 3.1's scaling: wavelengths above `original_context / low_freq_factor` divided by `factor`, those below
    `original_context / high_freq_factor` kept, the ones between interpolated smoothly."""
    wavelength = np.float32(2 * math.pi) / inv_freq
    low_freq_wavelength = original_context / low_freq_factor
    high_freq_wavelength = original_context / high_freq_factor
    scaled = np.where(wavelength > low_freq_wavelength, inv_freq / np.float32(factor), inv_freq)
    smooth = (original_context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
    medium = (wavelength >= high_freq_wavelength) & (wavelength <= low_freq_wavelength)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature for a context `factor` (1 where the context is not extended)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_frequencies(head_dim: int, theta: float, factor: float, original_context: int, *, beta_fast: float,
                     beta_slow: float, truncate: bool) -> np.ndarray:
    """YaRN's blend: dimensions that rotate more than `beta_fast` times over the original context keep their
    frequency (extrapolation), those rotating fewer than `beta_slow` times are divided by `factor` (interpolation),
    with a linear ramp between."""
    def dimension(rotations: float) -> float:  # the dimension that rotates `rotations` times over the context
        return head_dim * math.log(original_context / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dimension(beta_fast), dimension(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as the reference: no division by zero
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolated = 1 - ramp
    wavelengths = np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim))
    kept, divided = np.float32(1.0) / wavelengths, np.float32(1.0) / (np.float32(factor) * wavelengths)
    return (divided * (1 - extrapolated) + kept * extrapolated).astype(np.float32)
