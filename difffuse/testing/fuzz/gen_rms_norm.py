"""rms_norm cases: `x * rsqrt(mean(x²) + eps) [* w]` in every spelling the family takes
(pow / square / x*x / x**2, mean / sum÷D, both product orders, eps either side, nn.RMSNorm,
F.rms_norm, diffusers' RMSNorm, `.float()` casts at each place), weight forms (none,
parameter, strided `W[:, 0]`, [1, 1, D], another dtype) — and its near-misses (another
reduction dim or two dims, var instead of the mean of squares, eps outside the rsqrt, x**4,
sum÷(D+1), another tensor normalised, a weight over another dim, integer / bool casts at
each place (the squared side, one factor of x*x, between norm and weight), `alpha=` on the
eps add, `dtype=` on the mean; `mean(-1).unsqueeze(-1)`, which must fuse or be reported)."""
from __future__ import annotations

from .case import Case, Draw, Expect, dims, free, loosest, near, param, randn, site

FAMILY = "rms_norm"
EPS = (1e-6, 1e-5, 1e-3, 0.1, 0.5)

NEAR = ("none", "dim_other", "two_dims", "var", "eps_outside", "pow4", "sum_wrong_n", "other_tensor",
        "int_sq", "int_one_side", "int_mid", "bool_mid", "weight_other_dim")
FREE = ("alpha_eps", "mean_dtype", "sum_dtype64", "keepdim_unsqueeze", "narrow_mid", "alpha1_eps")


def draw(d: Draw) -> Case:
    dtype = d("dtype", ("float32", "bfloat16", "float16"), (5, 3, 2))
    rank = d("rank", (3, 2, 4), (6, 2, 2))
    b, l = dims(d)
    D = d("D", (16, 13, 24, 8, 1, 33, 0), (4, 3, 2, 2, 1, 1, 0.4))
    h = 3 if rank == 4 else None
    shape = {2: [b * max(l, 1) if b else 0, D], 3: [b, l, D], 4: [b, l, 3, D]}[rank]
    layout = d("layout", ("contig", "transposed", "sliced", "strided", "batch_step"), (6, 1, 1, 1, 1))
    eps = d("eps", EPS)
    kind = d("kind", ("site", "near", "free"), (5, 3, 2))
    what = "none"
    if kind == "near":
        what = d("near", NEAR[1:])
    elif kind == "free":
        what = d("free", FREE)
    if what in ("dim_other", "two_dims", "weight_other_dim") and (rank == 2 or l < 2):
        what, kind = "none", "site"  # the other dim must have more than one entry to differ
    if kind == "site":  # an integer / bool cast of the result stays outside the site
        what = d("final", ("none", "int_final", "bool_final"), (8, 1, 1))
    spelling = "manual"
    if what in ("none", "int_final", "bool_final"):
        spelling = d("spelling", ("manual", "nn", "F", "diffusers"), (5, 2, 2, 1))
    weight = d("weight", ("param", "none", "strided", "bcast_full", "fp32_param"), (5, 3, 2, 1, 1))
    if what in ("int_mid", "bool_mid", "weight_other_dim") and weight == "none":
        weight = "param"
    if spelling == "nn" and weight not in ("param", "none") or spelling == "F" and weight == "bcast_full":
        weight = "param"  # nn.RMSNorm owns its weight; F.rms_norm takes a [D] weight only
    wdtype = "float32" if weight == "fp32_param" else dtype
    init, helpers, body = [], [], []
    w = None
    if weight in ("param", "fp32_param") and spelling != "nn":
        init.append(param("w", [D], wdtype))
        w = "self.w"
    elif weight == "strided":
        init.append(param("W", [D, 2], dtype))
        w = "self.W[:, 0]"
    elif weight == "bcast_full":
        init.append(param("w", [1, 1, D] if rank >= 3 else [1, D], dtype))
        w = "self.w"
    if what == "weight_other_dim":
        init[-1:] = [param("w", [l, 1] if rank == 3 else [l, 1, 1], dtype)]
        w = "self.w"
    expect = {FAMILY: site()}
    tol = loosest(dtype, wdtype)

    if spelling == "nn":
        aff = weight == "param"
        init.append(f"self.norm = nn.RMSNorm({D}, eps={eps}, elementwise_affine={aff}, dtype=torch.{dtype})")
        body.append("y = self.norm(x)")
    elif spelling == "F":
        e = d("F_eps", (str(eps), "None"))
        body.append(f"y = F.rms_norm(x, ({D},), {w}, {e})")
    elif spelling == "diffusers":
        body += ["var = x.to(torch.float32).pow(2).mean(-1, keepdim=True)",
                 f"y = x * torch.rsqrt(var + {eps})"]
        if w is not None:
            body += [f"y = y.to({w}.dtype) if {w}.dtype in (torch.float16, torch.bfloat16) else y.to(x.dtype)",
                     f"y = y * {w}"]
    else:
        body += manual(d, what, w, eps, D, dtype, len(shape))
    if what in ("int_final", "bool_final"):
        body.append(f"y = y.to(torch.{'int32' if what == 'int_final' else 'bool'})")
    else:
        final = d("final_cast", ("none", "to_x", "float"), (6, 2, 1))
        if final == "to_x":
            body.append("y = y.to(x.dtype)")
        elif final == "float":
            body.append("y = y.float()")
    body.append("return y")

    if kind == "near":
        # a bare norm is a valid site inside these (the weight / cast stays outside it)
        expect = {FAMILY: near(1 if what in ("weight_other_dim", "int_mid", "bool_mid") else 0)}
    elif kind == "free":
        expect = {FAMILY: free()}
        if what == "narrow_mid":
            tol = loosest(tol, "float16")
    if what == "mean_dtype" or d.values.get("x_cast") == "narrow_before":
        tol = loosest(tol, "bfloat16")  # eager rounds in a low dtype where the op may not
    if 0 in shape:  # zero-size: left to Inductor or fused; never a crash (test_regressions: reported)
        kind, expect = "free", {FAMILY: Expect(want=0, allow=1, report=0)}
    name = f"{kind}:{what}/{spelling}/{dtype}/{shape}/{layout}/w={weight}"
    case = Case(FAMILY, kind, name, init, body, [("x", randn(shape, dtype, layout))], expect, tol, helpers)
    # an integer cast after a site turns a last-bit difference into a unit (case.py)
    case.outliers = 0.05 if what in ("int_mid", "bool_mid", "int_final", "bool_final") else 0.0
    return case


def manual(d: Draw, what: str, w, eps, D: int, dtype: str, rank: int) -> list:
    """A hand-written RMSNorm, with the near-miss `what` (or none) in it."""
    x_cast = d("x_cast", ("none", "both", "separate", "square", "int_before", "narrow_before", "widen64"),
               (5, 2, 2, 2, 1, 1, 0.5))
    square = d("square", ("pow", "square", "mul", "starstar"))
    reduce = d("reduce", ("mean", "mean_posdim", "sum_div", "sum_div_shape"), (4, 2, 2, 1))
    order = d("order", ("x_r", "r_x"), (3, 1))
    eps_form = d("eps_form", ("plain", "left"), (3, 1))
    lines = []
    xm = xs = "x"
    if x_cast == "both":
        lines.append("xf = x.float()")
        xm = xs = "xf"
    elif x_cast == "separate":
        xm = xs = "x.float()"
    elif x_cast == "square":
        xs = "x.to(torch.float32)"
    elif x_cast == "int_before":
        lines.append("x = (x * 4).to(torch.int32).to(x.dtype)")
    elif x_cast == "widen64":
        lines.append("xf = x.double()")
        xm = xs = "xf"
    elif x_cast == "narrow_before":
        lines.append(f"x = x.to(torch.{'float16' if dtype != 'float16' else 'bfloat16'})")
    if what == "int_sq":
        xs, square = "x.to(torch.int32)", "pow2.0"
    if what == "other_tensor":
        xm = "(x + 1)"
    sq = {"pow": f"{xs}.pow(2)", "square": f"torch.square({xs})", "mul": f"{xs} * {xs}",
          "starstar": f"{xs} ** 2", "pow2.0": f"{xs}.pow(2.0)"}[square]
    if what == "int_one_side":
        sq = f"{xs} * {xs}.to(torch.int32)"
    if what == "pow4":
        sq = f"{xs}.pow(4)"
    red_dim = "-1"
    if what == "dim_other":
        red_dim = "-2"
    ms = {"mean": f"({sq}).mean({red_dim}, keepdim=True)",
          "mean_posdim": f"({sq}).mean(dim={rank - 1 if red_dim == '-1' else rank - 2}, keepdim=True)",
          "sum_div": f"({sq}).sum({red_dim}, keepdim=True) / {D}",
          "sum_div_shape": f"({sq}).sum({red_dim}, keepdim=True) / x.shape[{red_dim}]"}[reduce]
    if what == "two_dims":
        ms = f"({sq}).mean((-2, -1), keepdim=True)"
    elif what == "var":
        ms = f"{xs}.var(-1, keepdim=True, unbiased=False)"
    elif what == "sum_wrong_n":
        ms = f"({sq}).sum(-1, keepdim=True) / {D + 1}"
    elif what == "mean_dtype":
        ms = f"({sq}).mean(-1, keepdim=True, dtype=torch.float32)"
    elif what == "sum_dtype64":
        ms = f"({sq}).sum(-1, keepdim=True, dtype=torch.float64) / {D}"
    elif what == "keepdim_unsqueeze":
        ms = f"({sq}).mean(-1).unsqueeze(-1)"
    lines.append(f"ms = {ms}")
    ve = f"ms + {eps}" if eps_form == "plain" else f"{eps} + ms"
    if what == "alpha_eps":
        ve = f"torch.add(ms, {eps}, alpha={d('alpha', (100, 0.5, 2, -0.5))})"
    elif what == "alpha1_eps":
        ve = f"torch.add(ms, {eps}, alpha=1)"
    r = f"torch.rsqrt({ve})"
    if what == "eps_outside":
        r = f"(torch.rsqrt(ms) + {eps})"
    lines.append(f"y = {xm} * {r}" if order == "x_r" else f"y = {r} * {xm}")
    if what == "int_mid":
        lines.append("y = y.to(torch.int32)")
    elif what == "bool_mid":
        lines.append("y = y.to(torch.bool)")
    elif what == "narrow_mid":
        lines.append(f"y = y.to(torch.{'bfloat16' if dtype == 'float16' else 'float16'})")
    elif x_cast in ("both", "separate", "square") and w is not None and d.flag("cast_before_w", 0.5):
        lines.append(f"y = y.to({w}.dtype)")
    if w is not None:
        lines.append(f"y = y * {w}")
    return lines
