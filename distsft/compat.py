"""Declared patches: every place where distsft changes or mends a third-party library's behaviour (a forward replaced
on an instance, a private function or state used), the library versions it was checked on, and the test that holds
it. ``checked(name)`` is called where the patch is applied, at start-up, and logs a warning once per patch when the
installed version is outside the checked ones (the patch may then be wrong or no longer needed: run its test).

    name                 package        checked on   what                                   tested by (tests/)
    model.head           transformers   5.25         head's forward replaced on the         unit/test_head.py
                                                     instance (supervised positions only)
    model.peft           peft           0.21         LoRA Linear's forward replaced         unit/test_lora_fused.py
                                                     (the adapter added in place)
    model.offload        transformers   5.25         _gradient_checkpointing_func wrapped   unit/test_offload.py
    model.tiling         deepspeed      0.19         TiledMLP in each decoder MLP           unit/test_tiling.py
    model.kernels        liger-kernel   0.8          _apply_liger_kernel_to_instance        gpu/test_gpu.py
    model.fp8            torchao        0.17, 0.18   Float8Linear's forward replaced, the   unit/test_fp8.py
                                                     private inductor patch applied
    trainer.fsdp_on_cpu  accelerate     1.16         PartialState made FSDP on CPU          integration/test_hybrid.py
    trainer.tp_mesh      accelerate     1.16         the device mesh set after init (size-  integration/
                                                     1 dp_shard kept); ReplicateParallel,   test_tensor_parallel.py
                                                     which _prepare_tp imports, supplied
    model.sequence       deepspeed      0.19         UlyssesSPAttentionHF registered on     integration/
                                                     FSDP2's sp group (not DeepSpeed's)     test_tensor_parallel.py
    model.tensor         transformers   5.25         the private _resolve_parallel_plans;   integration/
                                                     model._tp_size set for Accelerate      test_tensor_parallel.py
    trainer.reshape      deepspeed      0.19         ZeRO-3 universal loader mended: its    integration/
                                                     shared `step`, group hyperparameters   test_deepspeed.py
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

log = logging.getLogger("distsft")


@dataclass(frozen=True)
class Patch:
    package: str
    versions: tuple[str, ...]  # major.minor prefixes it was checked on
    what: str


PATCHES = {
    "model.head": Patch("transformers", ("5.25",), "the output head's forward, replaced on the instance"),
    "model.peft": Patch("peft", ("0.21",), "LoRA Linear's forward, replaced (the adapter added in place)"),
    "model.offload": Patch("transformers", ("5.25",), "a layer's _gradient_checkpointing_func, wrapped"),
    "model.tiling": Patch("deepspeed", ("0.19",), "DeepSpeed's TiledMLP in the decoder MLPs' forward"),
    "model.kernels": Patch("liger-kernel", ("0.8",), "Liger's private _apply_liger_kernel_to_instance"),
    "model.fp8": Patch("torchao", ("0.17", "0.18"), "Float8Linear's forward and torchao's private inductor patch"),
    "trainer.fsdp_on_cpu": Patch("accelerate", ("1.16",), "Accelerate's PartialState made FSDP on CPU processes"),
    "trainer.tp_mesh": Patch("accelerate", ("1.16",), "the device mesh set after init; ReplicateParallel supplied"),
    "model.sequence": Patch("deepspeed", ("0.19",), "Ulysses' attention module registered on FSDP2's sp group"),
    "model.tensor": Patch("transformers", ("5.25",), "the private _resolve_parallel_plans, and model._tp_size"),
    "trainer.reshape": Patch("deepspeed", ("0.19",), "DeepSpeed's ZeRO-3 universal loader, mended"),
}
_warned: set[str] = set()


def checked(name: str) -> bool:
    """Whether the installed package of patch ``name`` (PATCHES) is one of the versions it was checked on; warns once
    if not. A package that is not installed (the patch cannot apply) answers False without a warning."""
    patch = PATCHES[name]
    try:
        installed = version(patch.package)
    except PackageNotFoundError:
        return False
    if any(installed == v or installed.startswith(v + ".") for v in patch.versions):
        return True
    if name not in _warned:
        _warned.add(name)
        log.warning("%s: distsft patches %s (%s), checked on %s %s; %s is installed: the patch may be wrong or no "
                    "longer needed (distsft/compat.py names the test that covers it)", name, patch.package,
                    patch.what, patch.package, ", ".join(patch.versions), installed)
    return False
