"""Typed site records: what a lowering is told about one call of a `difffuse::*` op.

A pattern proves a match on the graph, then describes each op call it will insert as one
of these records: the op's arguments as `TensorSpec`s (shape, strides, dtype, device, and
whether the graph computes the operand) and constants. A lowering's `supports(site)`
sees only this — never graph nodes — so each kernel's eligibility (strides included) is
stated once, from the record, and is testable without a graph: `TensorSpec.of(tensor)`.
Field names are the op's argument names (`lowering/ops.py`).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true


def known(cond) -> bool:
    """True only where `cond` holds for every value of the symbols in it."""
    return bool(statically_known_true(cond))


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One tensor operand as the op will receive it (sizes and strides may be symbolic)."""
    shape: tuple
    stride: tuple
    dtype: torch.dtype
    device: str  # device type: "cuda", "cpu", "npu", ...
    computed: bool = False  # the graph computes it (not a graph input or parameter, through views)

    @classmethod
    def of(cls, t, computed: bool = False) -> Optional["TensorSpec"]:
        if not isinstance(t, torch.Tensor):
            return None
        return cls(tuple(t.shape), tuple(t.stride()), t.dtype, t.device.type, computed)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def numel(self):
        n = 1
        for s in self.shape:
            n = n * s
        return n

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def is_complex(self) -> bool:
        return self.dtype.is_complex

    def is_contiguous(self) -> bool:
        """Row-major dense (dims of size 1 may have any stride)."""
        expected = 1
        for size, st in reversed(list(zip(self.shape, self.stride))):
            if known(size == 1):
                continue
            if not known(st == expected):
                return False
            expected = expected * size
        return True

    def has_zero_dim(self) -> bool:
        return any(known(s == 0) for s in self.shape)

    def last_stride_is_one(self) -> bool:
        return self.ndim == 0 or known(self.shape[-1] == 1) or known(self.stride[-1] == 1)

    def expanded_strides(self, shape) -> list:
        """Strides of this operand broadcast to `shape` (0 along broadcast dims)."""
        out = [0] * len(shape)
        off = len(shape) - self.ndim
        for i, (size, st) in enumerate(zip(self.shape, self.stride)):
            out[off + i] = 0 if known(size == 1) and not known(shape[off + i] == 1) else st
        return out


def specs(site) -> list[TensorSpec]:
    """The tensor operands of a site record."""
    return [v for v in (getattr(site, f.name) for f in dataclasses.fields(site)) if isinstance(v, TensorSpec)]


@dataclasses.dataclass(frozen=True)
class RMSNormSite:
    FAMILY: ClassVar[str] = "rms_norm"
    x: TensorSpec
    weight: Optional[TensorSpec]
    eps: float
    out_dtype: torch.dtype


@dataclasses.dataclass(frozen=True)
class VarianceSite:
    """First half of a tensor-parallel RMSNorm: mean(x², -1) in fp32."""
    FAMILY: ClassVar[str] = "variance"
    x: TensorSpec


@dataclasses.dataclass(frozen=True)
class RsqrtMulSite:
    """Second half of a tensor-parallel RMSNorm: x * rsqrt(variance + eps) [* w]."""
    FAMILY: ClassVar[str] = "rsqrt_mul"
    x: TensorSpec
    weight: Optional[TensorSpec]
    eps: float
    out_dtype: torch.dtype


@dataclasses.dataclass(frozen=True)
class ScaleShiftSite:
    FAMILY: ClassVar[str] = "scale_shift"
    a: TensorSpec
    b: TensorSpec
    c: Optional[TensorSpec]
    k: float
    out_dtype: torch.dtype


@dataclasses.dataclass(frozen=True)
class NormScaleShiftSite:
    FAMILY: ClassVar[str] = "norm_scale_shift"
    x: TensorSpec
    residual: Optional[TensorSpec]
    gate: Optional[TensorSpec]
    weight: Optional[TensorSpec]
    bias: Optional[TensorSpec]
    scale: Optional[TensorSpec]
    shift: Optional[TensorSpec]
    eps: float
    k: float
    is_rms: bool
    residual_dtype: torch.dtype
    out_dtype: torch.dtype


@dataclasses.dataclass(frozen=True)
class QKNormRopeSite:
    """One op call: x is [.., H*D] (across_heads) or [.., H, D]; cos/sin broadcast against
    [.., H, D]. `full_tables`: every output element reads its own cos/sin entry (the stack
    form); otherwise an interleaved pair (2i, 2i+1) reads cos[2i] and sin[2i+1] (Wan, complex)."""
    FAMILY: ClassVar[str] = "qk_norm_rope"
    x: TensorSpec
    weight: Optional[TensorSpec]
    cos: TensorSpec
    sin: TensorSpec
    eps: float
    num_heads: int
    across_heads: bool
    interleaved: bool
    out_dtype: torch.dtype
    bias: Optional[TensorSpec] = None
    is_rms: bool = True
    full_tables: bool = False
    eps_tensor: bool = False  # eps is a 0-d tensor operand (a lifted Python float), `eps` unused

    @property
    def out_shape(self) -> tuple:
        if self.across_heads:
            return (*self.x.shape[:-1], self.num_heads, self.x.shape[-1] // self.num_heads)
        return tuple(self.x.shape)


@dataclasses.dataclass(frozen=True)
class RopeSite:
    """A rope with no norm in front: x [.., D]; cos/sin broadcast against x. `slow_spelling`:
    the model computes it with complex tensors or in fp64 (what plain Inductor cannot
    compile into one kernel)."""
    FAMILY: ClassVar[str] = "rope"
    x: TensorSpec
    cos: TensorSpec
    sin: TensorSpec
    interleaved: bool
    out_dtype: torch.dtype
    full_tables: bool = True
    slow_spelling: bool = False


@dataclasses.dataclass(frozen=True)
class LinearGeluSite:
    FAMILY: ClassVar[str] = "linear_gelu"
    x: TensorSpec
    weight: TensorSpec
    bias: TensorSpec
    out_dtype: torch.dtype


@dataclasses.dataclass(frozen=True)
class AttentionSite:
    """One exact attention call: q [B, H, Lq, D], k [B, H, Lkv, D], v [B, H, Lkv, Dv] (the
    `[B, H, L, D]` views SDPA got, strides as they come), no mask, no dropout, equal head
    counts. scale None = 1/sqrt(D); is_causal only with Lq == Lkv (where top-left and
    bottom-right alignment agree). `lse_used`: the graph reads the logsumexp (ring
    attention merges partial outputs by it), so the kernel must return it. `source`: the
    aten op the call replaces (`_scaled_dot_product_flash_attention_for_cpu`, ...)."""
    FAMILY: ClassVar[str] = "attention"
    q: TensorSpec
    k: TensorSpec
    v: TensorSpec
    scale: Optional[float]
    is_causal: bool
    lse_used: bool
    source: str = ""


SITE_TYPES = {cls.FAMILY: cls for cls in (RMSNormSite, VarianceSite, RsqrtMulSite, ScaleShiftSite,
                                          NormScaleShiftSite, QKNormRopeSite, RopeSite, LinearGeluSite,
                                          AttentionSite)}


@dataclasses.dataclass(frozen=True)
class FP8QuantSite:
    """A fused op whose output `y` is also quantised to float8_e4m3fn per row (the fp8 twin
    of `inner`'s op, lowering/ops.py): `inner` is the op's own record, `store_y` whether
    anything else still reads y (else it is not written)."""
    FAMILY: ClassVar[str] = "fp8_quant"
    inner: object  # the producer's typed site record (RMSNormSite, ScaleShiftSite, NormScaleShiftSite)
    y: TensorSpec
    store_y: bool
    granularity: str = "row"


SITE_TYPES[FP8QuantSite.FAMILY] = FP8QuantSite
