"""The public optimizers of the low-rank family: the one core with AdamW, 8-bit AdamW or Adafactor as the inner rule,
and GaLore's or APOLLO's outer rule (`hf_galore.family`).

Defaults follow the plain optimizer each one stands for (torch.optim.AdamW, bitsandbytes AdamW8bit,
transformers Adafactor), so a param group without `rank` behaves exactly like it. Each also takes the core's
keyword-only options (`**galore`): `galore_params`, `galore_config`, `layerwise`, `should_step`
(see `GaLoreOptimizer`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .core import GaLoreOptimizer
from .family import APOLLO
from .inner import MIN_8BIT_SIZE, AdafactorUpdate, AdamW8bitUpdate, AdamWUpdate


class GaLoreAdamW(GaLoreOptimizer):
    """AdamW whose moments live in each target weight's rank-r gradient subspace."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        **galore: Any,
    ) -> None:
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults, inner=AdamWUpdate(), **galore)


class ApolloAdamW(GaLoreAdamW):
    """APOLLO (Zhu et al., 2025): AdamW's moments of a random rank-r projection set one learning-rate scale per
    channel (APOLLO) or per tensor (APOLLO-Mini: rank 1, scale_type='tensor') of each target's full gradient.

    Same arguments as GaLoreAdamW: targets come as `galore_params` + `galore_config` (an `ApolloConfig` or a dict of
    its fields), or as groups with a `rank` key (APOLLO's keys `proj` and `scale_type` and the rest default as in
    `ApolloConfig`).
    """

    outer = APOLLO


class GaLoreAdamW8bit(GaLoreOptimizer):
    """GaLoreAdamW with bitsandbytes' 8-bit block-wise moments (CPU and CUDA)."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        min_8bit_size: int = MIN_8BIT_SIZE,
        **galore: Any,
    ) -> None:
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults, inner=AdamW8bitUpdate(min_8bit_size=min_8bit_size), **galore)


class ApolloAdamW8bit(GaLoreAdamW8bit):
    """ApolloAdamW with bitsandbytes' 8-bit block-wise moments of the projected gradient (no transformers name: use
    the class; `min_8bit_size` as GaLoreAdamW8bit)."""

    outer = APOLLO


class GaLoreAdafactor(GaLoreOptimizer):
    """Adafactor in the subspace; defaults and options as transformers.optimization.Adafactor."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | None = None,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool = True,
        warmup_init: bool = False,
        **galore: Any,
    ) -> None:
        if warmup_init and not relative_step:
            raise ValueError("Invalid warmup_init=True with relative_step=False: warm-up init needs relative steps.")
        defaults = {
            "lr": lr,
            "eps": tuple(eps),
            "clip_threshold": clip_threshold,
            "decay_rate": decay_rate,
            "beta1": beta1,
            "weight_decay": weight_decay,
            "scale_parameter": scale_parameter,
            "relative_step": relative_step,
            "warmup_init": warmup_init,
        }
        super().__init__(params, defaults, inner=AdafactorUpdate(), **galore)
