"""linear_gelu: a Linear followed by tanh-GELU (diffusers `gelu-approximate`, every Wan FFN).

    h = [view](addmm(b, x2d, permute(w, [1, 0])), shape) ─(convert fp32)?─┐
    0.5·h · (1 + tanh(0.7978845608·(h + 0.044715·h·h·h)))  ─(convert)? ─┘
      ==>  view(difffuse::linear_gelu(x2d, w, b, out_dtype), shape)

On CUDA this lowers to `aten._addmm_activation(b, x2d, w.t(), use_gelu=True)`, cuBLASLt's
tanh-GELU epilogue, so the wide activation is never written and re-read. That aten op is
erf-GELU on CPU, so only lowerings that list `linear_gelu` in IMPLS take it; the reference
op computes tanh-GELU itself. Not matched: erf-GELU, other constants, a pre-activation
that has other users (it would have to be written anyway).

A tanh-GELU of a Linear's output that no variant spells is still a site (`anchors`), and
the `explain` row (last in the table, it never rewrites) reports what stands between the
two: Inductor's pad_mm (on CUDA it may pad the matmul, by benchmark, and the GELU reads a
slice of it), a one-output Linear Inductor decomposed into sum(x * w) + b (in bf16/fp16
with casts around it), an mm + bias add, a pre-activation with other users, a GELU not
spelled as F.gelu decomposes.
"""
from __future__ import annotations

import itertools
import math
from typing import Optional

import torch
from torch._inductor.pattern_matcher import CallFunction, Ignored, KeywordArg

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
            # mat2: nn.Linear's permute(w, [1, 0]), or a [in, out] matrix code passes itself
            # (LightX2V's torch.addmm(b, x, w_t, out=...)): the weight is read from it in `check`
            mm = CallFunction(aten.addmm.default, KeywordArg("bias"), KeywordArg("x"), KeywordArg("mat2"),
                              _users=1 if viewed else users)
            h = CallFunction([aten.reshape.default, aten.view.default], mm, KeywordArg("shape"),
                             _users=users) if viewed else mm
            g = gelu_tanh(cast(h, users=4) if h_cast else h)
            p = cast(g) if out_cast else g
            name = f"{'view' if viewed else '2d'}/{'cast_h' if h_cast else 'h'}/{'cast_out' if out_cast else 'out'}"
            out.append(Variant(name, p, {"h_cast": h_cast}))
        out.append(Variant("explain", CallFunction(aten.tanh.default, Ignored()), {"explain": True}))
        return out

    def anchor_of(self, match):
        return next((n for n in match.nodes if n.target == aten.tanh.default), None)

    def check(self, match, variant):
        if variant.info.get("explain"):
            return explain(match.output_node())
        kw = match.kwargs
        for key, want in GELU_CONSTANTS.items():
            got = kw[key]
            if not isinstance(got, (int, float)) or not math.isclose(got, want, rel_tol=1e-6):
                return f"GELU constant {key} is {got}, not {want}"
        mat2 = kw["mat2"]
        permuted = (isinstance(mat2, torch.fx.Node) and mat2.target == aten.permute.default
                    and list(mat2.args[1]) == [1, 0])
        weight = mat2.args[0] if permuted else mat2
        x, w, b = val(kw["x"]), val(weight), val(kw["bias"])
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
        return {"x": kw["x"], "weight": weight, "transposed": not permuted, "bias": kw["bias"],
                "out_dtype": out.dtype, "mm_dtype": x.dtype, "shape": kw.get("shape")}

    def anchors(self, graph):
        # only a tanh whose input is the GELU polynomial: erf-GELU and plain tanh are not sites
        # (of a Linear's output: GELU of anything else is not this family's site)
        return [n for n in graph.find_nodes(op="call_function", target=aten.tanh.default)
                if _is_linear_output(gelu_input(n))]

    def replace(self, match, variant, site, ctx):
        impl, out_dtype, transposed = ctx.impl(self.name), site["out_dtype"], site["transposed"]

        def op(x, w, b, dtype):  # the fused op takes nn.Linear's [out, in] weight
            return impl(x, w.t() if transposed else w, b, dtype)

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
SLICE = aten.slice.Tensor  # pad_mm: the matmul runs on padded operands, its result is sliced


def gelu_input(tanh) -> Optional[torch.fx.Node]:
    """h of `tanh(sqrt(2/pi) * (h + 0.044715 h^3))` (through a cast), None for another tanh."""
    arg = tanh.args[0] if tanh.args else None
    if not (isinstance(arg, torch.fx.Node) and arg.target == aten.mul.Tensor and isinstance(arg.args[1], float)
            and math.isclose(arg.args[1], GELU_CONSTANTS["sqrt_2_over_pi"])):
        return None
    inner = arg.args[0]
    h = inner.args[0] if isinstance(inner, torch.fx.Node) and inner.target == aten.add.Tensor else None
    return h.args[0] if isinstance(h, torch.fx.Node) and h.target == CONVERT else h


def linear_chain(h, depth: int = 6) -> list:
    """The nodes from h back to a Linear's matmul (addmm, mm, or the `sum(x * w) + b` Inductor
    makes of a one-output Linear), through views, casts, pad_mm's slices and a bias add
    (either order); [] if h is not a Linear's output."""
    chain = []
    while isinstance(h, torch.fx.Node) and depth:
        chain.append(h)
        if h.target in (aten.addmm.default, aten.mm.default) or _is_decomposed_mv(h):
            return chain
        if h.target in VIEWS or h.target in (CONVERT, SLICE):
            h = h.args[0]
        elif h.target == aten.add.Tensor and len(h.args) == 2:  # the bias add, either order
            h = next((a for a in h.args if isinstance(a, torch.fx.Node)
                      and a.target in (aten.mm.default, SLICE, *VIEWS)), h.args[0])
        else:
            return []
        depth -= 1
    return []


def _is_linear_output(h) -> bool:
    """h is a Linear's output (see `linear_chain`)."""
    return bool(linear_chain(h))


def explain(tanh) -> str:
    """Why a Linear + tanh-GELU site was not matched: what stands between the Linear and the
    GELU, or how the GELU is spelled (for a tanh that is no site: says so)."""
    h = gelu_input(tanh)
    chain = linear_chain(h)
    if not chain:
        return "not a tanh-GELU of a Linear's output"
    mm, ops = chain[-1], [n.target for n in chain]
    if SLICE in ops:
        padded = any(getattr(a, "target", None) == aten.constant_pad_nd.default for a in mm.args)
        return ("the GELU reads a slice of the Linear's matmul, which no variant spells"
                + (": its operands are padded (Inductor's pad_mm pads a CUDA matmul to aligned sizes where "
                   "its benchmark finds that faster)" if padded else ""))
    if mm.target not in (aten.addmm.default, aten.mm.default):
        return ("Inductor decomposed this one-output Linear into sum(x * w) + b (a matrix-vector product): "
                "there is no matmul to give a GELU epilogue")
    if mm.target == aten.mm.default:
        bias = any(n.target == aten.add.Tensor for n in chain)
        return ("the Linear is an mm and a separate bias add (Inductor split the addmm), not one addmm"
                if bias else "a Linear without bias (mm, no addmm): the fused op takes a bias")
    read = tanh.args[0].args[0].args[0]  # what the GELU polynomial reads: h, or h cast
    gelu = _gelu_nodes(tanh, read)
    if any(u not in gelu for u in read.users) or (read is not chain[0] and len(chain[0].users) > 1):
        return "the Linear's output has other users besides the GELU: it is written anyway"
    steps = [n for n in chain[1:-1] if n.target not in VIEWS]
    if steps:
        return f"{', '.join(_op(n) for n in steps)} between the Linear and the GELU, which no variant spells"
    return ("the tanh-GELU is not spelled as F.gelu(approximate='tanh') decomposes "
            "(0.5 * h * (1 + tanh(sqrt(2/pi) * (h + 0.044715 * h * h * h)))): written out in another order")


def _gelu_nodes(tanh, read, limit: int = 24) -> set:
    """The nodes of the GELU that reads `read`: upstream of its output (what reads
    `tanh + 1`), downstream of `read`."""
    outs = [o for a in tanh.users if a.target == aten.add.Tensor for o in a.users if o.target == aten.mul.Tensor]
    found, todo = set(), list(outs)
    while todo and len(found) < limit:
        n = todo.pop()
        if n in found or n is read or not isinstance(n, torch.fx.Node):
            continue
        found.add(n)
        todo += n.all_input_nodes
    return found


def _op(node) -> str:
    return str(getattr(node.target, "__name__", node.target))


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
