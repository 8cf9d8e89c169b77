"""CPU packing of the decoding step's linear layers: MKL's packed GEMM for the few rows (images x beam) of a step.

`prepare_for_cpu_decoding(model)` is the one entry point (deploy.runtime.TorchRuntime.for_captioning calls it for
every model loaded to caption on the CPU): the step's linear layers become `PackedLinear`s over weights stored in
(in, out) memory order, and each decoder layer's five input projections of the eval step one `JointPackedLinear`.
Same parameters, values and state dict. Figures: docs/benchmarks.md, "Decoding".
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.dynamic_expansion import DynamicExpansionBlock

STEP_LAYERS = ("decoders.", "dec_reduce_group", "vocab_linear")  # the linear layers a decoding step runs
KEPT_PACKINGS = 4  # row counts a process alternates between (full and last batches, beam and greedy)
MAX_ROWS = 256  # more rows than this: F.linear (packing pays for few rows only)


@functools.cache
def mkl_packed_gemm_available() -> bool:
    """Whether this PyTorch has MKL's packed GEMM (x86 builds with MKL; not aarch64 or macOS arm64)."""
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


def packable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a product of x with `weight` runs packed: few rows, no gradients, float32 on the CPU, not under
    autocast, tracing, export or compilation, and a PyTorch built with MKL (cheap conditions first)."""
    return (x.numel() // weight.shape[1] <= MAX_ROWS and not torch.is_grad_enabled()
            and x.dtype == weight.dtype == torch.float32 and x.device.type == "cpu"
            and not torch.is_autocast_enabled("cpu") and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling() and not torch.onnx.is_in_onnx_export()
            and mkl_packed_gemm_available())


class _Packings:
    """Packed weights by key (row count and the versions of the tensors packed), the oldest dropped beyond
    KEPT_PACKINGS: an in-place update of a weight (load_state_dict, an optimizer step) makes a new key."""

    def __init__(self) -> None:
        self.kept: dict[tuple, Any] = {}

    def get(self, key: tuple, pack: Callable[[], Any]) -> Any:
        if key not in self.kept:
            if len(self.kept) >= KEPT_PACKINGS:
                del self.kept[next(iter(self.kept))]
            self.kept[key] = pack()
        return self.kept[key]

    def __len__(self) -> int:
        return len(self.kept)


def _version(p: torch.Tensor) -> tuple[int, int]:
    return p._version, p.data_ptr()


class PackedLinear(nn.Linear):
    """nn.Linear whose products of few rows run MKL's packed GEMM: the weight is packed once per row count
    (torch.ops.mkl, the packing torch.compile's CPU weight prepacking uses) and re-packed when the weight changes.
    1.3-1.5x faster than F.linear at 40 rows. Everything else (see `packable`) takes F.linear. Same parameters and
    state dict as the nn.Linear it replaces."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.packings = _Packings()

    @classmethod
    def replacing(cls, linear: nn.Linear) -> PackedLinear:
        """A PackedLinear holding `linear`'s own parameters (not copies)."""
        packed = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        packed.weight = linear.weight
        packed.bias = linear.bias
        return packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not packable(x, self.weight):
            return F.linear(x, self.weight, self.bias)
        rows = x.numel() // self.in_features
        packed = self.packings.get((rows, *_version(self.weight)),
                                   lambda: torch.ops.mkl._mkl_reorder_linear_weight(self.weight.detach(), rows))
        return torch.ops.mkl._mkl_linear(x, packed, self.weight, self.bias, rows)


class JointPackedLinear:
    """Several linear layers of one input as one packed product of their weights side by side: the same values as
    one by one (MKL's sums per output do not depend on the other columns), one call instead of several. Not a
    module (the layers keep their parameters and state dict); where a product is not packable, each layer runs
    on its own."""

    def __init__(self, linears: Sequence[nn.Linear]) -> None:
        if any(linear.bias is None for linear in linears):
            raise ValueError("JointPackedLinear joins layers with biases only")
        self.linears = tuple(linears)
        self.packings = _Packings()

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not packable(x, self.linears[0].weight):
            return [linear(x) for linear in self.linears]
        rows = x.numel() // x.shape[-1]
        key = (rows, *(_version(p) for linear in self.linears for p in (linear.weight, linear.bias)))
        packed, weight, bias = self.packings.get(key, lambda: self._pack(rows))
        return list(torch.ops.mkl._mkl_linear(x, packed, weight, bias, rows).split(
            [linear.out_features for linear in self.linears], dim=-1))

    def _pack(self, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        weight = torch.cat([linear.weight.detach() for linear in self.linears]).t().contiguous().t()  # (in, out)
        bias = torch.cat([linear.bias.detach() for linear in self.linears])
        return torch.ops.mkl._mkl_reorder_linear_weight(weight, rows), weight, bias


def prepare_for_cpu_decoding(model: nn.Module) -> nn.Module:
    """Make the decoding step's linear layers (decoder layers, the reduction, the vocabulary projection) fast for the
    few rows every step multiplies: PackedLinear over weights stored in (in, out) memory order, which is what MKL's
    plain GEMM prefers at few rows where packing is not available, and each dynamic expansion's five input
    projections joined (DynamicExpansionBlock.joint_projections). Same parameters, values and state dict; 1.5-2.5x
    faster products at 40 rows. For a model loaded to caption: a model in training keeps the layout its optimizer
    state and DDP buckets were made for. Returns the model."""
    for name, module in list(model.named_modules()):
        if not name.startswith(STEP_LAYERS):
            continue
        if isinstance(module, nn.Linear) and module.weight.is_contiguous():
            module.weight.data = module.weight.data.t().contiguous().t()
        if type(module) is nn.Linear:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, PackedLinear.replacing(module))
    for module in model.modules():
        if isinstance(module, DynamicExpansionBlock):
            module.joint_projections = JointPackedLinear(module.step_projections())
    return model
