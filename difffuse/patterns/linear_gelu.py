"""linear_gelu: a Linear followed by tanh-GELU (diffusers `gelu-approximate`, every Wan FFN).

    h = [view](addmm(b, x2d, permute(w, [1, 0])), shape) ─(convert fp32)?─┐
    0.5·h · (1 + tanh(0.7978845608·(h + 0.044715·h·h·h)))  ─(convert)? ─┘
      ==>  view(difffuse::linear_gelu(x2d, w, b, out_dtype), shape)

On CUDA this lowers to `aten._addmm_activation(b, x2d, w.t(), use_gelu=True)`, cuBLASLt's
tanh-GELU epilogue, so the wide activation is never written and re-read. That aten op is
erf-GELU on CPU, so only lowerings that list `linear_gelu` in IMPLS take it; the reference
op computes tanh-GELU itself. Not matched: erf-GELU, other constants, a pre-activation
that has other users (it would have to be written anyway).
"""
from __future__ import annotations

import itertools
import math

import torch
from torch._inductor.pattern_matcher import CallFunction, KeywordArg

from .common import CONVERT, Family, Variant, aten, cast, is_number, val

GELU_CONSTANTS = {"half": 0.5, "cubic": 0.044715, "sqrt_2_over_pi": math.sqrt(2 / math.pi), "one": 1}


def gelu_tanh(h):
    """The post-grad decomposition of F.gelu(h, approximate="tanh"); h is used 4 times."""
    cube = CallFunction(aten.mul.Tensor, CallFunction(aten.mul.Tensor, h, h), h)
    inner = CallFunction(aten.add.Tensor, h, CallFunction(aten.mul.Tensor, cube, KeywordArg("cubic")))
    t = CallFunction(aten.tanh.default, CallFunction(aten.mul.Tensor, inner, KeywordArg("sqrt_2_over_pi")))
    return CallFunction(aten.mul.Tensor, CallFunction(aten.mul.Tensor, h, KeywordArg("half")),
                        CallFunction(aten.add.Tensor, t, KeywordArg("one")))


class LinearGeluPattern(Family):
    name = "linear_gelu"

    def variants(self):
        out = []
        for viewed, h_cast, out_cast in itertools.product((True, False), repeat=3):
            users = 1 if h_cast else 4
            mm = CallFunction(aten.addmm.default, KeywordArg("bias"), KeywordArg("x"),
                              CallFunction(aten.permute.default, KeywordArg("weight"), [1, 0]),
                              _users=1 if viewed else users)
            h = CallFunction([aten.reshape.default, aten.view.default], mm, KeywordArg("shape"),
                             _users=users) if viewed else mm
            g = gelu_tanh(cast(h, users=4) if h_cast else h)
            p = cast(g) if out_cast else g
            name = f"{'view' if viewed else '2d'}/{'cast_h' if h_cast else 'h'}/{'cast_out' if out_cast else 'out'}"
            out.append(Variant(name, p, {"h_cast": h_cast}))
        return out

    def anchor_of(self, match):
        return next((n for n in match.nodes if n.target == aten.tanh.default), None)

    def check(self, match, variant):
        kw = match.kwargs
        for key, want in GELU_CONSTANTS.items():
            got = kw[key]
            if not isinstance(got, (int, float)) or not math.isclose(got, want, rel_tol=1e-6):
                return f"GELU constant {key} is {got}, not {want}"
        x, w, b = val(kw["x"]), val(kw["weight"]), val(kw["bias"])
        if any(not isinstance(t, torch.Tensor) for t in (x, w, b)) or w.ndim != 2 or x.ndim != 2:
            return "not a 2-D Linear"
        if b.ndim != 1:
            return f"bias of shape {tuple(b.shape)} is not a vector"
        if variant.info["h_cast"]:
            cvt = next(n for n in match.nodes if n.target == CONVERT and n.args[1] == torch.float32
                       and n.args[0].target in (aten.reshape.default, aten.view.default, aten.addmm.default))
            if val(cvt.args[0]).dtype not in (torch.float16, torch.bfloat16, torch.float32):
                return "unexpected pre-activation dtype"
        out = val(match.output_node())
        return {"x": kw["x"], "weight": kw["weight"], "bias": kw["bias"], "out_dtype": out.dtype,
                "mm_dtype": x.dtype, "shape": kw.get("shape")}

    def anchors(self, graph):
        # only a tanh whose input is the GELU polynomial: erf-GELU and plain tanh are not sites
        # (of a Linear's output: GELU of anything else is not this family's site)
        found = []
        for n in graph.find_nodes(op="call_function", target=aten.tanh.default):
            arg = n.args[0]
            if not (isinstance(arg, torch.fx.Node) and arg.target == aten.mul.Tensor
                    and isinstance(arg.args[1], float)
                    and math.isclose(arg.args[1], GELU_CONSTANTS["sqrt_2_over_pi"])):
                continue
            h = arg.args[0].args[0] if isinstance(arg.args[0], torch.fx.Node) and arg.args[0].args else None
            if isinstance(h, torch.fx.Node) and h.target == CONVERT:
                h = h.args[0]
            if _is_linear_output(h):
                found.append(n)
        return found

    def replace(self, match, variant, site, ctx):
        op, out_dtype = ctx.impl(self.name), site["out_dtype"]
        if site["shape"] is None:  # 2-D Linear: no view around the addmm
            ctx.replace(match, lambda x, w, b: op(x, w, b, out_dtype), [site["x"], site["weight"], site["bias"]])
            return
        shape = list(site["shape"])
        # symbolic dims of the output shape are graph nodes: pass them in as SymInt inputs
        sym = [i for i, s in enumerate(shape) if isinstance(s, torch.fx.Node)]

        def fused(x, w, b, *dims):
            full = list(shape)
            for i, d in zip(sym, dims):
                full[i] = d
            return op(x, w, b, out_dtype).reshape(full)

        ctx.replace(match, fused, [site["x"], site["weight"], site["bias"]] + [shape[i] for i in sym])


FAMILY = LinearGeluPattern()


VIEWS = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)


def _is_linear_output(h, depth: int = 3) -> bool:
    """h is a Linear's output: addmm, or mm (+ a bias add), through views (a non-contiguous
    3-D input decomposes to view -> mm -> view -> add(bias), which no variant spells), or
    the `sum(x * w) + b` that Inductor makes of a one-row Linear (a matrix-vector product)."""
    while isinstance(h, torch.fx.Node) and depth:
        if h.target in (aten.addmm.default, aten.mm.default) or _is_decomposed_mv(h):
            return True
        if h.target in VIEWS:
            h = h.args[0]
        elif h.target == aten.add.Tensor and len(h.args) == 2:  # the bias add, either order
            h = next((a for a in h.args if isinstance(a, torch.fx.Node)
                      and a.target in (aten.mm.default, *VIEWS)), h.args[0])
        else:
            return False
        depth -= 1
    return False


def _is_decomposed_mv(h) -> bool:
    """`add(mul(sum(mul(x, w), [d]), 1), mul(b, 1))`: Inductor's decomposition of a small addmm."""
    if h.target != aten.add.Tensor:
        return False
    for a in h.args:
        while isinstance(a, torch.fx.Node) and (a.target == aten.mul.Tensor and is_number(a.args[1]) or a.target in (
                *VIEWS, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.default)):
            a = a.args[0]
        if isinstance(a, torch.fx.Node) and a.target == aten.sum.dim_IntList and getattr(
                a.args[0], "target", None) == aten.mul.Tensor:
            return True
    return False
