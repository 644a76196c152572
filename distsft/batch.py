"""Configuration stage, part 3: batch arithmetic, global = micro x accumulation x world size."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .config import ConfigError


@dataclass(frozen=True)
class BatchPlan:
    """global_batch_size = micro_batch_size x grad_accum x world_size, all resolved."""

    micro_batch_size: int
    grad_accum: int
    world_size: int
    global_batch_size: int

    def describe(self) -> str:
        return (f"micro_batch_size {self.micro_batch_size} x grad_accum {self.grad_accum} x "
                f"world_size {self.world_size} = global_batch_size {self.global_batch_size}")


def resolve_batch(micro: Optional[int], accum: Optional[int], global_: Optional[int],
                  world_size: int) -> BatchPlan:
    """Derive the unset one of (micro, accum, global) from the other two and the world size.

    >>> resolve_batch(4, None, 32, 2).grad_accum
    4
    """
    given = {"trainer.micro_batch_size": micro, "trainer.grad_accum": accum,
             "trainer.global_batch_size": global_}
    for key, value in given.items():
        if value is not None and value < 1:
            raise ConfigError(f"{key}={value} must be a positive integer")
    unset = [k for k, v in given.items() if v is None]
    if len(unset) > 1:
        raise ConfigError(f"set at least two of {', '.join(given)}; unset: {', '.join(unset)}")
    w = world_size
    if micro is None:
        if global_ % (accum * w):
            raise ConfigError(
                f"trainer.global_batch_size={global_} is not divisible by grad_accum {accum} x "
                f"world_size {w} = {accum * w}; cannot derive trainer.micro_batch_size")
        micro = global_ // (accum * w)
    elif accum is None:
        if global_ % (micro * w):
            raise ConfigError(
                f"trainer.global_batch_size={global_} is not divisible by micro_batch_size {micro} x "
                f"world_size {w} = {micro * w}; cannot derive trainer.grad_accum "
                f"(choose a global batch that is a multiple of {micro * w})")
        accum = global_ // (micro * w)
    elif global_ is None:
        global_ = micro * accum * w
    elif micro * accum * w != global_:
        raise ConfigError(
            f"micro_batch_size {micro} x grad_accum {accum} x world_size {w} = {micro * accum * w} "
            f"!= trainer.global_batch_size={global_}; set one of them to null to derive it")
    return BatchPlan(micro, accum, w, global_)
