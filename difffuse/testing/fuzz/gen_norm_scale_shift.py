"""norm_scale_shift cases: residual (none, `h + x`, `h + x*g`, `h + g*x`, ComfyUI's
`torch.addcmul(h, x, g)`, Wan's `(h.float() + x*g).type_as(h)` round trip) → LayerNorm /
RMSNorm (nn modules, F calls, diffusers' FP32LayerNorm `F.layer_norm(r.float(), ..).to(r.dtype)`,
var_mean by hand; with or without weight / bias) → AdaLN modulation `n*(k+scale)+shift`
(or `shift + n*(k+scale)`, FLUX.2's `(k+scale)*n + shift`, ComfyUI's
`torch.addcmul(shift, n, k + scale)`, scale-only `n*(k+scale)`) from a batch, table-chunk,
per-token or per-frame source (or none after a residual), `.type_as(h)` at the end,
returning (out, r) or out. Near-misses: integer / bool casts between norm and modulation,
`alpha=` on the residual add, a residual rounded through an integer dtype, modulation before
the norm, a scale computed from the residual sum `n*(1 + r*0.5) + shift`, LayerNorm over
another dim, eps outside the rsqrt, unbiased variance, r narrowed for the norm, k a tensor,
`torch.addcmul(shift, n, 1 + scale, value=2)`, `shift - n*(1 + scale)`. Free: `alpha=` on
`k + scale`, and `2 + scale` (k is read from the match).
Where a smaller valid site remains inside a near-miss (the norm+modulation reading r as a
plain input, or the residual+norm without the modulation), one match is allowed and the
output decides."""
from __future__ import annotations

import torch

from .case import Case, Draw, Expect, absent, dims, loosest, near, param, randn, site

FAMILY = "norm_scale_shift"
EPS = (1e-6, 1e-5, 1e-3, 0.25)
NEAR = ("int_mid", "bool_mid", "alpha_res", "int_res", "mod_before", "scale_from_r", "ln_dim1", "eps_outside",
        "unbiased", "r_narrowed", "k_tensor", "addcmul_value", "sub_outer")
FREE = ("alpha_k", "two_plus")


def promote(a: str, b: str) -> str:
    return str(torch.promote_types(getattr(torch, a), getattr(torch, b))).replace("torch.", "")


def draw(d: Draw) -> Case:
    dtype = d("dtype", ("float32", "bfloat16", "float16"), (5, 3, 2))
    b, l = dims(d)
    D = d("D", (16, 13, 24, 8, 2, 0), (4, 3, 2, 2, 1, 0.3))
    kind = d("kind", ("site", "near", "free"), (6, 4, 1))
    what = d("near", NEAR) if kind == "near" else d("free", FREE) if kind == "free" else "none"
    residual = d("residual", ("one", "gate", "none", "gate_first", "wan_rt", "wan_ffn", "gate_addcmul"),
                 (3, 3, 3, 1, 2, 2, 1))
    norm = d("norm", ("ln_native", "F_ln", "fp32ln", "manual_ln", "rms_native", "F_rms"), (3, 2, 3, 1, 2, 1))
    mod = d("mod", ("index", "chunk", "per_token", "emb_unsq", "per_frame", "none"), (3, 3, 2, 1, 1, 2))
    if what in ("alpha_res", "r_narrowed", "scale_from_r") and residual == "none":
        residual = "one"
    if what == "int_res":
        residual = "wan_rt"  # r = (h.float() + x*g).to(torch.int32)
    if what in ("int_mid", "bool_mid", "mod_before", "scale_from_r", "k_tensor", "alpha_k", "two_plus",
                "addcmul_value", "sub_outer") and mod == "none":
        mod = "index"
    if residual == "none" and mod == "none":
        mod = "chunk"  # a bare norm is not this family
    if what in ("ln_dim1", "eps_outside", "unbiased"):
        norm = "manual_ln"
    if what in ("ln_dim1",) and l < 2:
        l = 3
    if what == "mod_before":
        residual, mod = "none", "per_token"
    nf = 1
    if what == "scale_from_r" and mod == "per_frame":
        mod = "index"  # r is not unflattened by frame
    if mod == "per_frame":
        nf = d("frames", (2, 3))
        l = nf * max(1, l // nf) if l else 0
    aff = d("affine", ("none", "w", "wb"), (2, 1, 2))
    if norm.startswith("rms") or norm == "F_rms":
        aff = "w" if aff == "wb" else aff
    eps = d("eps", EPS)
    mdt = d("mod_dtype", ("float32", "same"), (2, 1))
    mdt = dtype if mdt == "same" else mdt
    shape = [b, l, D]
    layout = d("layout", ("contig", "transposed", "sliced"), (6, 1, 1))
    args = [("h", randn(shape, dtype, scale=2.0)), ("x", randn(shape, dtype, layout))]
    init, body = [], []
    tol = loosest(dtype, mdt)

    # --- modulation source
    if mod in ("index", "chunk", "emb_unsq"):
        args.append(("mod", randn([b, 6 * D] if mod == "emb_unsq" else [b, 6, D], mdt)))
    elif mod == "per_token":
        args.append(("mod", randn([b, l, 6, D], mdt)))
    elif mod == "per_frame":
        args.append(("mod", randn([b, nf, 6, D], mdt)))
    if mod == "chunk":
        init.append(param("table", [1, 6, D], mdt, scale=0.25))
        body.append("c = (self.table + mod.float()).chunk(6, dim=1)")
    elif mod == "per_token":
        init.append(param("table", [1, 6, D], mdt, scale=0.25))
        body.append("c = [t.squeeze(2) for t in (self.table.unsqueeze(0) + mod.float()).chunk(6, dim=2)]")
    elif mod == "per_frame":
        body.append("c = mod.chunk(6, dim=2)")
    elif mod == "emb_unsq":
        body.append("c = [t[:, None] for t in mod.chunk(6, dim=1)]")
    elif mod == "index":
        body.append("c = [mod[:, i, None] for i in range(6)]")
    shift, scale, gate = "c[0]", "c[1]", "c[2]"
    if mod == "per_frame":
        gate = "c[2][:, 0]"  # a gate of the first frame, [B, 1, D]: the residual is not unflattened

    # --- residual
    if residual == "none":
        if what == "mod_before":
            body.append(f"r = {shift} + x * (1 + {scale})")
        else:
            body.append("r = x")
    elif residual == "one":
        body.append("r = h + x" if what != "alpha_res" else f"r = torch.add(h, x, alpha={d('alpha', (0.5, 2, -1))})")
    elif residual in ("gate", "gate_first", "gate_addcmul"):
        g = gate if mod != "none" else "self.g"
        if mod == "none":
            init.append(param("g", [D], mdt))
        prod = f"x * {g}" if residual != "gate_first" else f"{g} * x"
        body.append(f"r = h + {prod}" if what != "alpha_res" else f"r = torch.add(h, {prod}, alpha=0.5)")
        if residual == "gate_addcmul" and what != "alpha_res":
            body[-1] = f"r = torch.addcmul(h, x, {g})"
    else:  # Wan: computed in fp32, rounded by .type_as(h)
        g = gate if mod != "none" else "self.g"
        if mod == "none":
            init.append(param("g", [D], mdt))
        xs = "x.float()" if residual == "wan_ffn" else "x"
        tot = f"h.float() + {xs} * {g}" if what != "alpha_res" else f"torch.add(h.float(), {xs} * {g}, alpha=0.5)"
        body.append(f"r = ({tot}).type_as(h)" if what != "int_res" else f"r = ({tot}).to(torch.int32)")
    nin = "r.float()" if norm == "fp32ln" or residual.startswith("wan") else "r"
    if what == "r_narrowed":
        nin = f"r.to(torch.{'bfloat16' if dtype != 'bfloat16' else 'float16'}).float()"
        tol = loosest(tol, "bfloat16")
    if what == "int_res":
        nin = "r.float()"

    # --- dtypes: what the norm reads, what it returns, what the site returns
    nin_dt = dtype
    if nin.endswith(".float()") or (residual in ("gate", "gate_first", "gate_addcmul") and mdt == "float32") or (
            what == "mod_before"):  # per-token chunks of `table + mod.float()`: fp32
        nin_dt = "float32"
    elif residual in ("gate", "gate_first", "gate_addcmul"):  # chunks of `table + mod.float()` are fp32
        nin_dt = promote(dtype, "float32" if mod in ("chunk", "per_token") else mdt)
    n_dt = dtype if norm == "fp32ln" and residual != "none" else nin_dt if norm != "fp32ln" else dtype

    # --- norm
    wdt = "float32" if norm == "fp32ln" else nin_dt
    w = bias = "None"
    if aff in ("w", "wb") and norm not in ("ln_native", "rms_native"):
        init.append(param("w", [D], wdt))
        w = "self.w"
    if aff == "wb" and norm not in ("ln_native", "rms_native"):
        init.append(param("b", [D], wdt))
        bias = "self.b"
    if norm == "ln_native":
        init.append(f"self.norm = nn.LayerNorm({D}, eps={eps}, elementwise_affine={aff != 'none'}, "
                    f"bias={aff == 'wb'}, dtype=torch.{nin_dt})")
        body.append(f"n = self.norm({nin})")
    elif norm == "rms_native":
        init.append(f"self.norm = nn.RMSNorm({D}, eps={eps}, elementwise_affine={aff != 'none'}, dtype=torch.{nin_dt})")
        body.append(f"n = self.norm({nin})")
    elif norm == "F_ln":
        body.append(f"n = F.layer_norm({nin}, ({D},), {w}, {bias}, {eps})")
    elif norm == "fp32ln":
        body.append(f"n = F.layer_norm({nin}, ({D},), {w}, {bias}, {eps}).to(r.dtype)")
    elif norm == "F_rms":
        body.append(f"n = F.rms_norm({nin}, ({D},), {w}, {eps})")
    else:
        dim = "1" if what == "ln_dim1" else "-1"
        corr = 1 if what == "unbiased" else 0
        body.append(f"v, mu = torch.var_mean({nin}, dim={dim}, keepdim=True, correction={corr})")
        rs = f"(torch.rsqrt(v) + {eps})" if what == "eps_outside" else f"torch.rsqrt(v + {eps})"
        body.append(f"n = ({nin} - mu) * {rs}")
        if w != "None":
            body.append(f"n = n * {w}")
        if bias != "None":
            body.append(f"n = n + {bias}")

    # --- modulation
    if what == "int_mid":
        body.append("n = n.to(torch.int32)")
    elif what == "bool_mid":
        body.append("n = n.to(torch.bool)")
    spell = "none"
    if mod != "none" and what != "mod_before":
        k = d("k", (1, 0.5))
        fac = f"({k} + {scale})"
        if what == "scale_from_r":
            fac = "(1 + r * 0.5)"
        elif what == "k_tensor":
            init.append(param("kt", [1, 1, D], mdt))
            fac = f"(self.kt + {scale})"
        elif what == "alpha_k":
            fac = f"torch.add({scale}, {k}, alpha=3)"
        elif what == "two_plus":
            fac = f"(2 + {scale})"
        nn_ = f"n.unflatten(1, ({nf}, -1))" if mod == "per_frame" else "n"
        spell = d("spell", ("n*f+sh", "sh+n*f", "f*n+sh", "addcmul", "scale_only"), (4, 1, 2, 2, 2))
        body.append({"n*f+sh": f"out = {nn_} * {fac} + {shift}", "sh+n*f": f"out = {shift} + {nn_} * {fac}",
                     "f*n+sh": f"out = {fac} * {nn_} + {shift}", "addcmul": f"out = torch.addcmul({shift}, {nn_}, {fac})",
                     "scale_only": f"out = {nn_} * {fac}"}[spell])
        if what == "addcmul_value":
            body[-1] = f"out = torch.addcmul({shift}, {nn_}, {fac}, value=2)"
        elif what == "sub_outer":
            body[-1] = f"out = {shift} - {nn_} * {fac}"
        if mod == "per_frame":
            body.append("out = out.flatten(1, 2)")
    else:
        body.append("out = n")
    out_dt = promote(n_dt, mdt) if mod != "none" and what != "mod_before" else n_dt
    if d.flag("type_as", 0.5):
        body.append("out = out.type_as(h)")
        out_dt = dtype
    # the norm's output rounded to a low dtype, then modulated in fp32: not the op's one
    # final rounding; fusing is optional, leaving it unfused must be reported
    mid_round = n_dt != "float32" and out_dt == "float32" and mod != "none"
    two = residual != "none" and d.flag("return_r", 0.7)
    body.append("return out, r" if two else "return out")

    expect = {FAMILY: site()}
    if kind == "near":
        inner = 0
        if what in ("int_mid", "bool_mid", "k_tensor") and residual != "none":
            inner = 1  # the residual + norm without the modulation
        if what in ("alpha_res", "int_res", "scale_from_r") and mod != "none":
            inner = 1  # the norm + modulation of r read as an input
        if what in ("addcmul_value", "sub_outer") and residual != "none":
            inner = 1  # the residual + norm without the modulation
        if what == "r_narrowed":
            inner = 1  # r rounded, then upcast for the norm: the "roundtrip" form, exact
        expect = {FAMILY: near(inner)}
    elif kind == "free" or mid_round:
        # (a scale-only `n * add(s, k, alpha=3)` is no anchored form: nothing owed)
        owed = 0 if spell == "scale_only" and what == "alpha_k" else 1
        kind, expect = "free", {FAMILY: Expect(want=0, allow=1, report=owed)}
    if norm in ("rms_native", "F_rms") and kind != "near":
        # an RMSNorm is rms_norm's anchor: fused as rms_norm (+ scale_shift for the modulation)
        # nothing is left unfused
        expect[FAMILY].alt = {"rms_norm": 1, **({"scale_shift": 1} if mod != "none" else {})}
    if 0 in shape:
        kind, expect = "free", {FAMILY: Expect(want=0, allow=1, report=0)}
    name = f"{kind}:{what}/{residual}/{norm}/{aff}/mod={mod},{spell}/{dtype}/{shape}/{layout}"
    # no rope here: a rope miss would be a spurious one (the recogniser seeing a rope in a modulation)
    expect.update({"qk_norm_rope": absent(), "rope": absent()})
    case = Case(FAMILY, kind, name, init, body, args, expect, tol)
    # an integer cast after a site turns a last-bit difference into a unit (case.py)
    case.outliers = 0.05 if what in ("int_mid", "bool_mid", "int_res") else 0.0
    return case
