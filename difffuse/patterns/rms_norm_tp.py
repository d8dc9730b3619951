"""rms_norm, tensor-parallel form (design §3.1; seed: sglang `tensor_parallel_rms_norm`):
the last dim is sharded over a TP group, so the mean of squares is all-reduced (AVG)
before the rsqrt.

    x ─(convert fp32)?─┬─ pow(·,2) | mul(·,·) ─ mean.dim([-1], keepdim)      (fp32)
                       │   ─ _c10d_functional.all_reduce(·, "avg", group) ─ wait_tensor
                       │     | all_reduce(·, "sum", group) ─ wait_tensor ─ div(·, group size)
                       │   (─ copy(mean, ·): in-place `dist.all_reduce`, before noop removal)
                       │   ─ add(eps) ─ rsqrt ─┐
                       └──────────────── mul ◀─┘ ─ (convert)? ─ (mul w)? ─ (convert)?
      ==>  v = difffuse::variance(x)                      (lowering: NPU fused_variance)
           v = wait_tensor(all_reduce(v, same op, same group)) [/ group size]
           y = difffuse::rsqrt_mul(x, v, w, eps, out_dtype) (lowering: NPU fused_rsqrt_mul)

Post-grad forms dumped on torch 2.13 CPU with a 2-process gloo group: a functional
`fc.all_reduce(var, "avg", group)` and an in-place `dist.all_reduce(var)` both become
`_c10d_functional.all_reduce(mean, op, "<group name>") -> wait_tensor`; the in-place one
adds `aten.copy(mean, wait)`, which Inductor's noop removal drops before the custom pass
but which the `inductor=False` path still sees. The collective in the replacement is the
model's own (same reduce op and group name); only its neighbours change.

Matched only where the variance is fp32 (a bf16 variance would change what is
all-reduced) and a "sum" is divided by exactly the group's size. The plain rms_norm
checks (last dim, x², eps a constant, weight along the last dim, casts) apply unchanged.
Registered as extra variants of the `rms_norm` family: `RMSNormFamily` below is what
`patterns/__init__.py` loads for "rms_norm".

The same two ops take a plain RMSNorm whose eps is a 0-d tensor (a Python float that Dynamo
lifted to a graph input under dynamic shapes: `+ self.eps`; its value is not guarded, so
it is no constant the one-op rms_norm could take): `rsqrt_mul(x, variance(x) + eps, w,
-0.0)`, the model's own `mean + eps` computed in the graph between them (v + (-0.0) == v).
Where the lowering has no variance/rsqrt_mul the site is a miss with that reason.
"""
from __future__ import annotations

import itertools

import torch
from torch._inductor.pattern_matcher import CallFunction, KeywordArg

from .canonical_forms import CompletedPass, Completions
from .common import Variant, aten, typed_site, val
from .rms_norm import ADD_EPS, EPS_TENSOR, TAILS, RMSNormPattern, check_rms_core, why_not, with_tail

c10d = torch.ops._c10d_functional
ALL_REDUCE = c10d.all_reduce.default
WAIT = c10d.wait_tensor.default


def tp_core(x, square: str, collective: str, copy: bool):
    """`x * rsqrt(allreduce(mean(x²)) + eps)` in the spellings above (canonical order: x first)."""
    sq = (CallFunction(aten.pow.Tensor_Scalar, x, KeywordArg("exponent")) if square == "pow"
          else CallFunction(aten.mul.Tensor, x, x))
    mean = CallFunction(aten.mean.dim, sq, KeywordArg("dims"), True, _users=2 if copy else 1)
    red = CallFunction(WAIT, CallFunction(ALL_REDUCE, mean, KeywordArg("reduce_op"), KeywordArg("group_name")))
    if copy:
        red = CallFunction(aten.copy.default, mean, red)
    if collective == "sum_div":
        red = CallFunction(aten.div.Tensor, red, KeywordArg("world"))
    rs = CallFunction(aten.rsqrt.default, CallFunction(ADD_EPS, red, KeywordArg("eps")))
    return CallFunction(aten.mul.Tensor, x, rs)


def group_size(group_name: str) -> int | None:
    try:
        from torch.distributed.distributed_c10d import _resolve_process_group

        return _resolve_process_group(group_name).size()
    except Exception:  # no such group in this process
        return None


class RMSNormFamily(RMSNormPattern):
    """The rms_norm family: RMSNormPattern's table plus the tensor-parallel variants."""

    def build_pass(self, get_ctx):
        self._get_ctx = get_ctx  # check() asks the lowering whether it has the TP ops

        def explain(graph):  # a reason for the anchors no variant matched, where the graph has one
            rejected = get_ctx().rejected
            for rs in self.anchors(graph):
                if rs not in rejected:
                    reason = why_not(rs)
                    if reason:
                        rejected[rs] = reason
        return CompletedPass(super().build_pass(get_ctx), Completions, explain)

    def variants(self) -> list[Variant]:
        return super().variants() + self.tp_variants()

    def tp_variants(self) -> list[Variant]:
        out = []
        # `x.float()` (sglang) or not: x is the norm's input either way (canonicalize.py)
        for square, collective, copy, tail in itertools.product(
                ("pow", "mul"), ("avg", "sum_div"), (False, True), TAILS):
            p = with_tail(tp_core(KeywordArg("x"), square, collective, copy), tail)
            name = "/".join(["tp", square, collective + ("_copy" if copy else ""), tail])
            out.append(Variant(name, p, {"tp": True, "tail": tail, "collective": collective}))
        return out

    def anchors(self, graph):
        found = super().anchors(graph)
        for n in graph.find_nodes(op="call_function", target=aten.rsqrt.default):
            add = n.args[0]
            if isinstance(add, torch.fx.Node) and add.target in ADD_EPS and _after_all_reduce(add.args[0]):
                found.append(n)
        return found

    def check(self, match, variant):
        core = check_rms_core(match, match.kwargs["x"])
        site = core if isinstance(core, str) else self.check_rest(match, variant, core)
        if isinstance(site, str):
            return site
        if "eps_node" in site:
            # eps a 0-d tensor input (rms_norm.py): `rsqrt_mul(x, variance(x) + eps, w, -0.0)`
            # computes the model's own `mean + eps` in the graph; v + (-0.0) == v exactly
            missing = self._missing_tp_ops()
            if missing:
                return f"{EPS_TENSOR}; the {self._get_ctx().lowering} lowering has no {missing} kernel to take it"
            site["eps"] = -0.0
        if not variant.info.get("tp"):
            return site
        kw = match.kwargs
        mean = next(n for n in match.nodes if n.target == aten.mean.dim)
        if val(mean).dtype != torch.float32:
            return f"variance computed in {val(mean).dtype}; the fused ops all-reduce an fp32 variance"
        want = "avg" if variant.info["collective"] == "avg" else "sum"
        if kw["reduce_op"] != want:
            return f"all_reduce op {kw['reduce_op']!r}, not the mean over the group"
        if want == "sum" and kw["world"] != group_size(kw["group_name"]):
            return f"sum all-reduced then divided by {kw['world']}, not by the group size"
        missing = self._missing_tp_ops()
        if missing:
            return f"the {self._get_ctx().lowering} lowering has no {missing} kernel"
        site.update(reduce_op=kw["reduce_op"], group_name=kw["group_name"],
                    world=kw.get("world") if want == "sum" else None)
        return site

    def _missing_tp_ops(self) -> str:
        impls = getattr(self._get_ctx().module, "IMPLS", {})
        return "/".join(f for f in ("variance", "rsqrt_mul") if f not in impls)

    def typed(self, site):
        """A tensor-parallel site (or one with a tensor eps) is two op calls: `variance(x)`
        and `rsqrt_mul(x, var, w)`."""
        if "reduce_op" not in site and "eps_node" not in site:
            return super().typed(site)
        return [typed_site("variance", site), typed_site("rsqrt_mul", site)]

    def replace(self, match, variant, site, ctx):
        if not variant.info.get("tp") and "eps_node" not in site:
            return super().replace(match, variant, site, ctx)
        var_op, rsqrt_mul = ctx.impl("variance"), ctx.impl("rsqrt_mul")
        eps, out_dtype = site["eps"], site["out_dtype"]
        op, group, world = site.get("reduce_op"), site.get("group_name"), site.get("world")
        names = [n for n in ("x", "eps_node", "weight") if site.get(n) is not None]

        def repl(*args):
            t = dict(zip(names, args))
            v = var_op(t["x"])
            if op is not None:
                v = c10d.wait_tensor(c10d.all_reduce(v, op, group))
                if world is not None:
                    v = v / world
            if "eps_node" in t:
                v = v + t["eps_node"]  # the model's `mean + eps`, eps its 0-d tensor
            return rsqrt_mul(t["x"], v, t.get("weight"), eps, out_dtype)

        ctx.replace(match, repl, [site[n] for n in names])


def _after_all_reduce(node) -> bool:
    """node is (copy of / div of) wait_tensor(all_reduce(...))."""
    while isinstance(node, torch.fx.Node) and node.target in (aten.div.Tensor, aten.copy.default):
        node = node.args[0] if node.target == aten.div.Tensor else node.args[1]
    return isinstance(node, torch.fx.Node) and node.target == WAIT


FAMILY = RMSNormFamily()
