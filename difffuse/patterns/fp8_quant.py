"""fp8_quant: torchao's dynamic float8 activation quantisation, fused into the difffuse op
whose output it quantises (issue 29; docs/fp8.md has the graph form and the numerics).

torchao 0.18 (`Float8DynamicActivationFloat8WeightConfig`, the "torch" kernel path)
quantises each fp8 Linear's input y per row (or per tensor) as this post-grad chain:

    c   = convert(y, float32)                       (absent when y is fp32)
    m   = amax(abs(y), [last dim], keepdim=True)    in y's dtype
    s   = convert(div(m, 448.0), float32)           the scale, [.., 1]
    q8  = convert(clamp_max(clamp_min(div(c, s), -448.0), 448.0), float8_e4m3fn)
      ─ readers of q8 and s (the `_scaled_mm`)

Where y is the output of a difffuse norm or modulation op (norm_scale_shift, rms_norm,
scale_shift, whichever lowering emitted it), the op is replaced by its fp8 twin
(lowering/ops.py: `*_fp8`), which also returns q and s from the same kernel; every chain
reading y (Wan's to_q, to_k, to_v: three identical chains) gets the same q and s, and y is
written only where something else still reads it. Numerics: equal to Inductor's
compilation of the chain on a GPU (s = fp32(amax) * fp32(1/448), not rounded to bf16),
except that a row of zeros gets s = 1.0 (q = 0) where torchao gives s = 0 and NaN.

Every fp8 cast the pass sees is matched or reported with its reason: another fp8 format
(e5m2), other constants, a clamp on the amax (torchao's activation_value_lb/ub), an amax
over other dims, a chain not reading a difffuse op's output (a GELU after `_scaled_mm`, a
graph input), or a lowering with no fp8 kernel.

Per tensor (`amax` over every dim of size > 1, scale [1, .., 1]): the same twin with
per_row=False. Its scale needs the whole tensor's amax before any value is cast, so y is
still written; the CUDA kernel writes each row's amax beside it, and the tensor's scale and
the cast are a small reduction and one pointwise kernel (Inductor's). What that saves is the
separate pass that reads y back for its amax.
"""
from __future__ import annotations

import logging
import operator
from typing import Optional

import torch

from .common import (CONVERT, Family, PassContext, aten, inserted, inserted_by, is_number, module_paths, spec,
                     typed_site, val, zero_size_reason)
from ..lowering.sites import FP8QuantSite, known

log = logging.getLogger("difffuse")

E4M3 = torch.float8_e4m3fn
FP8_TYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
                  if hasattr(torch, n))
FP8_MAX = 448.0
PRODUCERS = ("norm_scale_shift", "rms_norm", "scale_shift")  # families whose op has an fp8 twin
_CLAMPS = (aten.clamp_min.default, aten.clamp_max.default, aten.clamp.default)


class Chain:
    """One proven quantisation chain: the value y it quantises, its fp8 cast q8 and fp32
    scale s (the two values its readers use), its granularity and its nodes."""

    def __init__(self, y, q8, s, granularity: str, nodes: list):
        self.y, self.q8, self.s, self.granularity, self.nodes = y, q8, s, granularity, nodes


def _const(node, value: float) -> bool:
    return is_number(node) and float(node) == value


def _plain(node) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and not node.kwargs


def prove_chain(q8: torch.fx.Node) -> Chain | str:
    """The chain ending at the fp8 cast q8, proven node by node, or why it is not torchao's
    per-row / per-tensor e4m3fn quantisation."""
    dst = q8.args[1]
    if dst != E4M3:
        return f"a cast to {dst}: only float8_e4m3fn (torchao's default, max 448) is fused"
    nodes = [q8]
    n = q8.args[0]
    hi = lo = None
    # clamp(-448, 448): clamp_max(clamp_min(d)) as torchao's post-grad graph has it, or one clamp
    while _plain(n) and n.target in _CLAMPS:
        if n.target == aten.clamp.default:
            lo, hi = (n.args[1:] + (None, None))[:2]
        elif n.target == aten.clamp_max.default:
            hi = n.args[1]
        else:
            lo = n.args[1]
        nodes.append(n)
        n = n.args[0]
    if lo is None or hi is None:
        return "the fp8 cast is not preceded by clamp(-448, 448): not torchao's quantisation"
    if not (_const(lo, -FP8_MAX) and _const(hi, FP8_MAX)):
        return f"clamp({lo}, {hi}) before the fp8 cast: torchao's e4m3fn quantisation clamps to +-448"
    if not (_plain(n) and n.target == aten.div.Tensor and len(n.args) == 2):
        return f"the clamped value is {getattr(n, 'target', n)}, not x / scale"
    nodes.append(n)
    c, s = n.args
    if not isinstance(s, torch.fx.Node) or not isinstance(c, torch.fx.Node):
        return "x / scale with a constant operand"
    # c: y upcast to fp32 (or y itself when fp32)
    y = c
    if c.target == CONVERT and _plain(c):
        if c.args[1] != torch.float32:
            return f"the quantised value is cast to {c.args[1]}, not float32"
        y = c.args[0]
        nodes.append(c)
    # s: convert(div(amax(abs(y)), 448), f32), the convert absent for an fp32 y
    s16 = s
    if s.target == CONVERT and _plain(s):
        if s.args[1] != torch.float32:
            return f"the scale is cast to {s.args[1]}, not float32"
        s16 = s.args[0]
        nodes.append(s)
    sv = val(s)
    if not isinstance(sv, torch.Tensor) or sv.dtype != torch.float32:
        return "the scale is not a float32 tensor"
    if not (_plain(s16) and s16.target == aten.div.Tensor and len(s16.args) == 2):
        return f"the scale is {getattr(s16, 'target', s16)}, not amax / 448"
    nodes.append(s16)
    m, d = s16.args
    if not _const(d, FP8_MAX):
        return f"scale = amax / {d}: torchao's e4m3fn scale divides by 448 (57344 would be e5m2)"
    if isinstance(m, torch.fx.Node) and m.target in _CLAMPS:
        return "the amax is clamped before the scale (torchao's activation_value_lb/ub): not fused"
    if not (_plain(m) and m.target == aten.amax.default):
        return f"the scale is {getattr(m, 'target', m)} / 448, not amax / 448"
    nodes.append(m)
    a = m.args[0]
    dims = list(m.args[1]) if len(m.args) > 1 else []
    keep = m.args[2] if len(m.args) > 2 else False
    if not (_plain(a) and a.target == aten.abs.default):
        return "the scale's amax is not of abs(x)"
    nodes.append(a)
    if a.args[0] is not y:
        return "the amax and the quantised value read different tensors"
    yv = val(y)
    if not isinstance(yv, torch.Tensor) or yv.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the quantised tensor is {getattr(yv, 'dtype', yv)}, not fp16/bf16/fp32"
    nd = yv.ndim
    if nd < 1:
        return "a 0-d tensor"
    dims = sorted({d % nd for d in dims})
    if not keep:
        return "amax without keepdim: not torchao's scale"
    # torchao reduces the dims whose block size is not 1: a dim of size 1 may be in or out
    one = [known(size == 1) for size in yv.shape]
    if nd - 1 in dims and all(one[d] for d in dims if d != nd - 1):
        gran = "row"
    elif all(one[d] for d in range(nd) if d not in dims):
        gran = "tensor"
    else:
        return (f"amax over dims {dims} of a tensor of shape {tuple(yv.shape)}: neither per row (the last dim) "
                f"nor per tensor")
    return Chain(y, q8, s, gran, nodes)


def _schema_args(node) -> dict:
    """A call's arguments by schema name, defaults filled in."""
    schema = node.target._schema
    out = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
    return out


def _kernel_name(node) -> Optional[str]:
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
    fn = getattr(kernel, "fn", kernel)
    return getattr(fn, "__name__", None) or getattr(getattr(fn, "fn", None), "__name__", None)


def read_producer(y: torch.fx.Node, ctx: PassContext) -> tuple | str:
    """(family, the op's arguments by name, {output: node}, the call node) of the difffuse op
    that computed y, read back from whichever form its lowering emitted; or why y is not one."""
    node, key = (y.args[0], y.args[1]) if y.target == operator.getitem else (y, None)
    tag = inserted_by(node)
    if y.target == CONVERT and inserted_by(y.args[0]) and not tag:
        return (f"the quantised tensor is a cast to {y.args[1]} of difffuse's {inserted_by(y.args[0])[0]} output, "
                f"not the op's output itself")
    if not tag:
        what = getattr(y.target, "__name__", str(y.target)) if y.op == "call_function" else y.op
        return f"the quantised tensor is not the output of a difffuse norm or modulation op (it is {what})"
    if tag[0] not in PRODUCERS:
        return f"the quantised tensor is the output of difffuse's {tag[0]} op, which has no fp8 twin"
    read = getattr(ctx.module, "READ_BACK", {})
    target = node.target
    if target is torch.ops.higher_order.triton_kernel_wrapper_functional:
        from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

        named = {**kernel_side_table.get_constant_args(node.kwargs["constant_args_idx"]), **node.kwargs["kwargs"]}
        dtypes = {k: val(v).dtype for k, v in named.items() if isinstance(val(v), torch.Tensor)}
        found = read["kernel"](_kernel_name(node), named, dtypes) if "kernel" in read else None
    elif isinstance(target, torch._ops.OpOverload) and target.namespace == "difffuse":
        name, args = target._schema.name.split("::")[-1], _schema_args(node)
        if name in PRODUCERS:  # the logical op (reference lowering and any lowering that keeps it)
            found = name, args, ({"y": 0, "r": 1} if name == "norm_scale_shift" else {"y": None})
        else:
            found = read["op"](name, args) if "op" in read else None
    else:
        found = None
    if found is None:
        return f"the {ctx.lowering} lowering's {tag[0]} call cannot be read back to fuse the quantisation"
    family, args, keys = found
    if keys.get("y") != key:
        return f"the quantised tensor is not the {family} op's main output"
    outs = {"y": y}
    if keys.get("r") is not None:  # the residual sum, where the call returns it
        outs["r"] = next((u for u in node.users if u.target == operator.getitem and u.args[1] == keys["r"]), None)
    return family, args, outs, node


def _fake_mode():
    import contextlib

    from torch._inductor.virtualized import NullHandler, V

    mode = V.fake_mode
    return mode if mode is not None and not isinstance(mode, NullHandler) else contextlib.nullcontext()


def _dead_after(chains: list, y) -> set:
    """Nodes of the chains nothing reads once every q8 and s is replaced."""
    nodes = {n for c in chains for n in c.nodes}
    dead = {c.q8 for c in chains} | {c.s for c in chains}
    changed = True
    while changed:
        changed = False
        for n in nodes - dead:
            if all(u in dead for u in n.users):
                dead.add(n)
                changed = True
    return dead


class FP8QuantFamily(Family):
    name = "fp8_quant"

    def variants(self):
        return []

    def anchors(self, graph):
        """Every cast to a float8 type that is still in the graph (a quantisation left to Inductor)."""
        return [n for n in graph.find_nodes(op="call_function", target=CONVERT)
                if n.args[1] in FP8_TYPES and n.users and not inserted(n)]

    def build_pass(self, get_ctx):
        return _FP8Pass(self, get_ctx)

    # ------------------------------------------------------------------
    def site(self, y, chains: list, ctx: PassContext) -> dict | str:
        """The site a group of chains reading y becomes, or why not (never raises)."""
        try:
            gran = chains[0].granularity
            found = read_producer(y, ctx)
            if isinstance(found, str):
                return found
            family, args, outs, node = found
            dead = _dead_after(chains, y)
            store_y = any(u not in dead for u in y.users)
            inner = typed_site(family, args)
            record = FP8QuantSite(inner, spec(y), store_y, gran)
            reason = zero_size_reason([inner])
            if reason:
                return reason
            reason = ctx.supports(record)
            if reason:
                return f"{ctx.lowering} lowering does not take it: {reason}"
            return {"family": family, "args": args, "outs": outs, "node": node, "store_y": store_y, "dead": dead,
                    "per_row": gran == "row"}
        except Exception as exc:  # noqa: BLE001  (a bad site is a miss, never an aborted pass)
            log.warning("difffuse: fp8_quant check failed on a site (%s: %s); left to Inductor", type(exc).__name__, exc)
            return f"internal error in the fp8_quant check ({type(exc).__name__}: {exc}); left to Inductor"

    def build(self, site: dict, ctx: PassContext):
        """Trace the fp8 twin's call (as the lowering traces replacements); no graph change."""
        from torch._inductor.pattern_matcher import fwd_only

        args, family, store_y, per_row = site["args"], site["family"], site["store_y"], site["per_row"]
        names = [k for k, v in args.items() if isinstance(v, torch.fx.Node)]
        impl = ctx.impl(self.name)
        has_r = family == "norm_scale_shift"

        def fused(*tensors):
            y, r, q, s = impl(family, {**args, **dict(zip(names, tensors))}, store_y, per_row)
            return (y, r, q, s) if has_r else (y, q, s)

        trace = getattr(ctx.module, "trace_replacement", None) or fwd_only
        with _fake_mode():  # as Match.replace_by_example traces: in the graph's fake mode
            gm = trace(fused, [val(args[n]) for n in names])
        if any(n.op == "get_attr" for n in gm.graph.nodes):
            raise RuntimeError("the traced replacement holds constants")
        return gm, [args[n] for n in names], has_r

    def rewrite(self, graph, chains: list, site: dict, gm, inputs: list, has_r: bool, variant: str) -> None:
        node = site["node"]
        env = dict(zip([n for n in gm.graph.nodes if n.op == "placeholder"], inputs))
        out = None
        with graph.inserting_before(node):
            for n in gm.graph.nodes:
                if n.op == "placeholder":
                    continue
                if n.op == "output":
                    out = torch.fx.map_arg(n.args[0], lambda a: env[a])
                    break
                new = graph.node_copy(n, lambda a: env[a])
                new.meta["difffuse_replacement"] = (self.name, variant)
                if "stack_trace" in site["outs"]["y"].meta:
                    new.meta.setdefault("stack_trace", site["outs"]["y"].meta["stack_trace"])
                env[n] = new
        y_new, r_new, q_new, s_new = out if has_r else (out[0], None, out[1], out[2])
        for c in chains:
            c.q8.replace_all_uses_with(q_new)
            if c.s.users:
                c.s.replace_all_uses_with(s_new)
        for n in reversed(list(graph.nodes)):
            if n in site["dead"] and not n.users:
                graph.erase_node(n)
        y = site["outs"]["y"]
        if y.users:
            y.replace_all_uses_with(y_new)
        r = site["outs"].get("r")
        if r is not None and r_new is not None and r.users:
            r.replace_all_uses_with(r_new)
        # the plain call and its outputs are unread now
        for u in list(node.users):
            if not u.users:
                graph.erase_node(u)
        if not node.users:
            graph.erase_node(node)


class _FP8Pass:
    """Finds every fp8 cast, proves its chain, groups chains by the tensor they quantise and
    replaces each group's producer with its fp8 twin (one call for all its readers)."""

    def __init__(self, family: FP8QuantFamily, get_ctx):
        self.family, self.get_ctx = family, get_ctx

    def apply(self, graph: torch.fx.Graph) -> int:
        ctx = self.get_ctx()
        fam = self.family
        groups: dict = {}
        for q8 in fam.anchors(graph):
            chain = prove_chain(q8)
            if isinstance(chain, str):
                ctx.rejected.setdefault(q8, chain)
                continue
            groups.setdefault((chain.y, chain.granularity), []).append(chain)
        done = quantisations = 0
        for (y, gran), chains in groups.items():
            if getattr(y, "_erased", False):  # y's op was rewritten for its other granularity's readers
                site = "the tensor is also quantised with the other granularity, whose readers were fused"
            else:
                site = fam.site(y, chains, ctx)
            if isinstance(site, str):
                for c in chains:
                    ctx.rejected.setdefault(c.q8, site)
                continue
            variant = f"{site['family']}/{gran}"
            ctx.current = (fam.name, variant)
            try:
                gm, inputs, has_r = fam.build(site, ctx)
            except Exception as exc:  # noqa: BLE001  (nothing changed yet: this site stays, reported)
                reason = f"the {ctx.lowering} replacement could not be built ({type(exc).__name__}: {exc})"
                log.warning("difffuse: fp8_quant: %s; left to Inductor", reason)
                for c in chains:
                    ctx.rejected.setdefault(c.q8, reason)
                continue
            modules = module_paths([n for c in chains for n in c.nodes] + [site["node"]])
            fam.rewrite(graph, chains, site, gm, inputs, has_r, variant)  # a failure here: the pass restores
            ctx.record.add_match(fam.name, variant, modules)
            done += 1
            quantisations += len(chains)
        if quantisations > done:  # the table counts fused calls; say how many quantisations they are
            ctx.record.notes.append(f"fp8_quant: {quantisations} quantisations fused into {done} calls "
                                    f"(the readers of one tensor share its fp8 data and scale)")
        return done


FAMILY = FP8QuantFamily()
