"""Configuration stage, part 3: batch arithmetic, global = micro x accumulation x data-parallel replicas.

Under sequence parallelism (``parallel.sp_size``) a group of sp ranks shares each micro-batch, every rank
holding a slice of each row; under tensor parallelism (``parallel.tp_size``) a group of tp ranks shares it, every
rank holding a slice of each weight: ``world = data-parallel x sp x tp``, and only the data-parallel replicas add
rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .config import ConfigError


@dataclass(frozen=True)
class BatchPlan:
    """global_batch_size = micro_batch_size x grad_accum x dp_size (world_size / (sp_size x tp_size)), all
    resolved."""

    micro_batch_size: int
    grad_accum: int
    world_size: int
    global_batch_size: int
    sp_size: int = 1
    tp_size: int = 1

    @property
    def group(self) -> int:
        """Ranks that share each micro-batch (sequence- or tensor-parallel)."""
        return self.sp_size * self.tp_size

    @property
    def dp_size(self) -> int:
        """Data-parallel replicas: the ranks that read different rows."""
        return self.world_size // self.group

    def describe(self) -> str:
        split = " x ".join(f"{what} {n}" for what, n in (("sequence-parallel", self.sp_size),
                                                           ("tensor-parallel", self.tp_size)) if n > 1)
        dp = f"data-parallel {self.dp_size} (world_size {self.world_size} / {split})" if split else \
            f"world_size {self.world_size}"
        return (f"micro_batch_size {self.micro_batch_size} x grad_accum {self.grad_accum} x "
                f"{dp} = global_batch_size {self.global_batch_size}")


def resolve_batch(micro: Optional[int], accum: Optional[int], global_: Optional[int],
                  world_size: int, sp_size: int = 1, tp_size: int = 1) -> BatchPlan:
    """Derive the unset one of (micro, accum, global) from the other two and the data-parallel size
    (world_size / (sp_size x tp_size)).

    >>> resolve_batch(4, None, 32, 2).grad_accum
    4
    >>> resolve_batch(4, None, 32, 4, sp_size=2).grad_accum
    4
    """
    if sp_size < 1 or tp_size < 1 or world_size % (sp_size * tp_size):
        split = " x ".join(f"parallel.{k}_size={v}" for k, v in (("sp", sp_size), ("tp", tp_size)) if v != 1)
        raise ConfigError(f"{split} must divide the world size {world_size} (world = data-parallel x "
                          f"sequence-parallel x tensor-parallel): launch a multiple of {sp_size * tp_size} processes")
    given = {"trainer.micro_batch_size": micro, "trainer.grad_accum": accum,
             "trainer.global_batch_size": global_}
    for key, value in given.items():
        if value is not None and value < 1:
            raise ConfigError(f"{key}={value} must be a positive integer")
    unset = [k for k, v in given.items() if v is None]
    if len(unset) > 1:
        raise ConfigError(f"set at least two of {', '.join(given)}; unset: {', '.join(unset)}")
    w = world_size // (sp_size * tp_size)
    if micro is None:
        if global_ % (accum * w):
            raise ConfigError(
                f"trainer.global_batch_size={global_} is not divisible by grad_accum {accum} x "
                f"{_dp(w, sp_size, tp_size)} = {accum * w}; cannot derive trainer.micro_batch_size")
        micro = global_ // (accum * w)
    elif accum is None:
        if global_ % (micro * w):
            raise ConfigError(
                f"trainer.global_batch_size={global_} is not divisible by micro_batch_size {micro} x "
                f"{_dp(w, sp_size, tp_size)} = {micro * w}; cannot derive trainer.grad_accum "
                f"(choose a global batch that is a multiple of {micro * w})")
        accum = global_ // (micro * w)
    elif global_ is None:
        global_ = micro * accum * w
    elif micro * accum * w != global_:
        raise ConfigError(
            f"micro_batch_size {micro} x grad_accum {accum} x {_dp(w, sp_size, tp_size)} = {micro * accum * w} "
            f"!= trainer.global_batch_size={global_}; set one of them to null to derive it")
    return BatchPlan(micro, accum, world_size, global_, sp_size, tp_size)


def _dp(w: int, sp: int, tp: int = 1) -> str:
    split = " x ".join(f"parallel.{k}_size={v}" for k, v in (("sp", sp), ("tp", tp)) if v > 1)
    return f"data-parallel size {w} (world_size / {split})" if split else f"world_size {w}"
