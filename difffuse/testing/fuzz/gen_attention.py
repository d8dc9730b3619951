"""attention cases: `F.scaled_dot_product_attention` on the `[B, H, L, D]` views diffusers
passes (of `[B, L, H, D]` memory) or on contiguous `[B, H, L, D]`, self and cross
attention, odd lengths and head dims, a constant scale or none, causal on square scores,
the output read back as `[B, L, H*D]`; fp32/bf16/fp16. Near-misses (must stay SDPA): a
boolean or additive mask, causal with Lq != Lkv (SDPA aligns top-left, flash kernels
bottom-right), grouped-query heads (enable_gqa), a scale computed from a tensor."""
from __future__ import annotations

from .case import Case, Draw, Expect, near, randn, site

FAMILY = "attention"
NEAR = ("bool_mask", "additive_mask", "causal_rectangular", "gqa", "tensor_scale")


def draw(d: Draw) -> Case:
    dtype = d("dtype", ("float32", "bfloat16", "float16"), (5, 3, 2))
    b = d("B", (2, 1, 3), (4, 3, 2))
    h = d("H", (3, 1, 4, 2))
    hd = d("D", (8, 16, 5, 64))
    lq = d("Lq", (10, 1, 7, 33))
    cross = d("cross", (False, True), (3, 2))
    lkv = d("Lkv", (6, 1, 13, 40)) if cross else lq
    layout = d("layout", ("blhd", "bhld"), (3, 1))
    kind = d("kind", ("site", "near"), (3, 2))
    what = d("near", NEAR) if kind == "near" else "none"
    hkv = 1 if what == "gqa" and h > 1 else h
    if what == "gqa" and h == 1:
        h = hkv = 1
        what = "bool_mask"
    if what == "causal_rectangular" and lkv == lq:
        lkv = lq + 3
    scale = d("scale", ("none", "const"), (2, 1))
    causal = what == "causal_rectangular" or (not cross and d("causal", (False, True), (3, 1)))

    def mem(name, l, heads):
        if layout == "blhd":
            return (name, randn([b, l, heads, hd], dtype)), f"{name}.transpose(1, 2)"
        return (name, randn([b, heads, l, hd], dtype)), name

    (qi, q), (ki, k), (vi, v) = mem("q", lq, h), mem("k", lkv, hkv), mem("v", lkv, hkv)
    kw = []
    if scale == "const" and what != "tensor_scale":  # tensor_scale passes its own scale
        kw.append(f"scale={0.37 if hd != 8 else 0.5}")
    if causal:
        kw.append("is_causal=True")
    inputs = [qi, ki, vi]
    if what == "bool_mask":
        kw.append("attn_mask=mask")
        inputs.append(("mask", f"(torch.rand({b}, 1, {lq}, {lkv}) > 0.2) | "
                               f"(torch.arange({lkv}) == 0)"))
    elif what == "additive_mask":
        kw.append(f"attn_mask=mask.to({'torch.' + dtype})")
        inputs.append(("mask", f"torch.randn({b}, 1, 1, {lkv})"))
    elif what == "gqa":
        kw.append("enable_gqa=True")
    elif what == "tensor_scale":
        kw.append("scale=float(s)")
        inputs.append(("s", "torch.rand(()) + 0.1"))
    body = [f"q_, k_, v_ = {q}, {k}, {v}",
            f"o = F.scaled_dot_product_attention(q_, k_, v_{''.join(', ' + a for a in kw)})",
            "return o.transpose(1, 2).flatten(2)"]
    expect = {FAMILY: site()} if kind == "site" else {FAMILY: near()}
    if what == "tensor_scale":  # Dynamo may specialize the float: then the scale is a constant site
        expect = {FAMILY: Expect(want=0, allow=1, report=0)}
    name = f"{kind}:{what}/{dtype}/B{b}H{h}/{hkv}D{hd}/Lq{lq}Lkv{lkv}/{layout}/causal={causal}/scale={scale}"
    return Case(FAMILY, kind, name, [], body, inputs, expect, dtype)
