"""qk_norm_rope cases: q (and k) → RMSNorm (nn.RMSNorm, diffusers' RMSNorm, F.rms_norm
without weight, by hand; weight a parameter or strided `W[:, 0]`) or LayerNorm, across
heads (before `unflatten`, Wan) or per head (Flux) → rope in each diffusers spelling: Wan's
strided writes into `empty_like`, the stack form `torch.stack([-x_imag, x_real], -1).flatten(3)`
(apply_rotary_emb, use_real_unbind_dim=-1), neox `rotate_half`, complex, LTX's whole-width
rope; with or without the `.float()` casts; tables pair-duplicated or random, fp32 or
the model's dtype, shaped [L, D] (indexed `[None, :, None]`), [L, 1, D] or [1, L, 1, D];
HunyuanVideo's token range `cat([rope(n[:, :a]), n[:, a:]])` either way round; output
transposed for attention or not. Near-misses: Wan's tables swapped or read at odd
offsets, a norm over another dim, a scale / GELU / integer round trip between norm and
rope, the normalised q also used outside the rope, odd head_dim with a partial rope, a
rope of a q that is not normalised. Free (may fuse, must be exact, unfused must be
reported): the stack form's tables swapped or sin negated (a rope of other tables),
cos/sin of different shapes, half-width tables given directly to Wan's form, Wan's form
on a token range."""
from __future__ import annotations

from .case import Case, Draw, Expect, dims, loosest, near, param, randn, site

FAMILY = "qk_norm_rope"
NEAR = ("wan_swapped", "wan_offset", "norm_dim_other", "scale_between", "gelu_between", "int_between",
        "used_twice", "odd_head", "no_norm")
FREE = ("stack_swapped", "neg_sin", "diff_tables", "wan_half_tables", "wan_token_range")


def tables(form: str, kind: str, rows: int, hd: int, tdt: str, tshape: str) -> list:
    """[(name, expr)] for the rope's inputs: cos and sin (real forms) or freqs (complex)."""
    lead = {"2d": [rows], "3d": [rows, 1], "4d": [1, rows, 1]}[tshape]
    kw = "" if tdt == "float32" else f", dtype=torch.{tdt}"
    if form == "complex":
        shp = ", ".join(map(str, lead + [hd // 2]))
        return [("freqs", f"torch.polar(torch.rand({shp}) + 0.5, torch.rand({shp}) * 6)")]
    if kind == "dup":
        shp = ", ".join(map(str, lead + [hd // 2]))
        mk = (lambda f: f"(torch.rand({shp}) * 6).{f}().repeat_interleave(2, -1)" + (f".to(torch.{tdt})" if kw else ""))
        return [("cos", mk("cos")), ("sin", mk("sin"))]
    shp = lead + [hd // 2 if kind == "half" else hd]
    return [("cos", randn(shp, tdt)), ("sin", randn(shp, tdt))]


def draw(d: Draw) -> Case:
    dtype = d("dtype", ("float32", "bfloat16", "float16"), (5, 3, 2))
    b, l = dims(d)
    heads = d("heads", (2, 1, 3))
    hd = d("head_dim", (8, 4, 16, 6, 2), (4, 2, 2, 1, 1))
    kind = d("kind", ("site", "near", "free"), (5, 3, 2))
    what = d("near", NEAR) if kind == "near" else d("free", FREE) if kind == "free" else "none"
    form = d("form", ("stack", "wan", "neox", "complex", "flat"), (4, 3, 2, 2, 1))
    if what.startswith("wan_"):
        form = "wan"
    if what in ("stack_swapped", "neg_sin", "odd_head"):
        form = "stack"
    if what == "diff_tables" and form in ("complex", "wan", "flat"):
        form = "stack"
    scope = d("scope", ("per_head", "across"))
    if form == "flat":
        scope = "across"
    norm = d("norm", ("nn_rms", "diffusers_rms", "F_rms", "manual_rms", "layernorm"), (3, 3, 1, 2, 2))
    if what == "norm_dim_other" and norm not in ("diffusers_rms", "manual_rms"):
        norm = "manual_rms"
    wform = d("weight", ("param", "strided"), (3, 1))
    if norm in ("nn_rms", "layernorm", "F_rms"):
        wform = "param"
    if what == "odd_head":
        hd = 9
    tkind = d("tables", ("dup", "random"), (1, 1))
    if what == "wan_half_tables":
        tkind = "half"
    tdt = d("table_dtype", ("float32", "same"), (3, 1))
    tdt = dtype if tdt == "same" else tdt
    tshape = d("table_shape", ("2d", "3d", "4d"), (3, 2, 1))
    casts = d("rope_casts", (True, False), (3, 1))
    if form == "complex" and dtype != "float32":
        casts = True  # view_as_complex takes fp32 pairs only
    token_range = d("token_range", ("none", "rope_first", "rest_first"), (5, 1, 1))
    if what == "wan_token_range":
        token_range = "rope_first"
    if form in ("flat",) or what in ("odd_head",):
        token_range = "none"
    if form == "wan" and token_range != "none" and kind == "site":
        kind, what = "free", "wan_token_range"  # Wan's strided writes on a token range: no variant (yet)
    ntext = 3 if token_range != "none" else 0
    both = d("q_and_k", (False, True), (2, 1))
    transpose = d("transpose", (True, False))
    layout = d("layout", ("contig", "sliced", "transposed"), (6, 1, 1))
    if form == "complex" and layout == "transposed":
        layout = "sliced"  # view_as_complex needs a unit last stride (eager raises too)
    eps = d("eps", (1e-6, 1e-5, 1e-3))
    width = heads * hd
    nd = width if scope == "across" else hd
    rows = l
    args = [("x", randn([b, l + ntext, width], dtype, layout))]
    if form == "flat":  # LTX: the whole q width is one head; tables [1, L, H*D] span it
        tabs = [(n, f"({e})[None]") for n, e in tables("stack", tkind, rows, width, tdt, "2d")]
    else:
        tabs = tables(form, tkind, rows, 8 if what == "odd_head" else hd, tdt, tshape)
    args += tabs
    init, body = [], []
    tol = loosest(dtype, tdt)

    # --- the norms
    names = ("q", "k") if both else ("q",)
    for nm in names:
        wdt = dtype
        if norm == "nn_rms":
            init.append(f"self.norm_{nm} = nn.RMSNorm({nd}, eps={eps}, dtype=torch.{dtype})")
            init.append(f"nn.init.normal_(self.norm_{nm}.weight)")
        elif norm == "layernorm":
            init.append(f"self.norm_{nm} = nn.LayerNorm({nd}, eps={eps}, dtype=torch.{dtype})")
            init.append(f"nn.init.normal_(self.norm_{nm}.weight)")
            init.append(f"nn.init.normal_(self.norm_{nm}.bias)")
        elif norm != "F_rms" or d.flag("F_weight", 0.5):
            init.append(param(f"w_{nm}" if wform == "param" else f"W_{nm}", [nd] if wform == "param" else [nd, 2], wdt))

    def norm_expr(nm: str, v: str) -> list:
        w = f"self.w_{nm}" if wform == "param" else f"self.W_{nm}[:, 0]"
        has_w = any(s.startswith(f"self.w_{nm} ") or s.startswith(f"self.W_{nm} ") for s in init)
        dim = "1" if what == "norm_dim_other" else "-1"
        if norm in ("nn_rms", "layernorm"):
            return [f"n = self.norm_{nm}({v})"]
        if norm == "F_rms":
            return [f"n = F.rms_norm({v}, ({nd},), {w if has_w else None}, {eps})"]
        if norm == "diffusers_rms":
            return [f"var = {v}.to(torch.float32).pow(2).mean({dim}, keepdim=True)",
                    f"n = {v} * torch.rsqrt(var + {eps})",
                    f"n = (n.to({w}.dtype) if {w}.dtype in (torch.float16, torch.bfloat16) else n.to({v}.dtype)) * {w}"]
        return [f"n = {v} * torch.rsqrt({v}.pow(2).mean({dim}, keepdim=True) + {eps}) * {w}"]

    for nm in names:
        src = f"x_{nm}"
        body.append(f"{src} = x * {1.0 if nm == 'q' else -0.5}")
        if what == "no_norm":
            body.append(f"n = {src}" if form == "flat" else f"n = {src}.unflatten(2, ({heads}, {hd}))")
        elif scope == "across":
            body += norm_expr(nm, src)
            if form != "flat":
                body.append(f"n = n.unflatten(2, ({heads}, {hd}))")
        else:
            body.append(f"{src} = {src}.unflatten(2, ({heads}, {hd}))")
            body += norm_expr(nm, src)
        if what == "scale_between":
            body.append("n = n * 0.5")
        elif what == "gelu_between":
            body.append("n = F.gelu(n)")
        elif what == "int_between":
            body.append("n = (n * 4).to(torch.int32).to(n.dtype)")
        roped = rope_lines(form, what, casts, tshape, ntext, token_range, width if form == "flat" else hd)
        body += roped
        if what == "used_twice":
            body.append("o = o + n")
        if transpose and form != "flat":
            body.append("o = o.transpose(1, 2)")
        body.append(f"o_{nm} = o")
    body.append("return " + ", ".join(f"o_{nm}" for nm in names))

    n_sites = len(names)
    expect = {FAMILY: site(n_sites)}
    if kind == "near":
        expect = {FAMILY: near()}
    elif kind == "free":
        expect = {FAMILY: Expect(want=0, allow=n_sites, report=n_sites)}
    if 0 in (b, l):
        kind, expect = "free", {FAMILY: Expect(want=0, allow=n_sites, report=0)}
    name = (f"{kind}:{what}/{form}/{norm}/{scope}/w={wform}/tables={tkind},{tdt},{tshape}/range={token_range}"
            f"/{dtype}/B{b} L{l} H{heads} D{hd}/{layout}/{'qk' if both else 'q'}")
    case = Case(FAMILY, kind, name, init, body, args, expect, tol)
    # an integer cast after a site turns a last-bit difference into a unit (case.py)
    case.outliers = 0.05 if what == "int_between" else 0.0
    return case


def rope_lines(form: str, what: str, casts: bool, tshape: str, ntext: int, token_range: str, hd: int) -> list:
    """Lines computing `o` = rope(n) (or, on a token range, rope of part of n joined with the rest)."""
    idx = {"2d": "[None, :, None, :]", "3d": "[None]", "4d": ""}[tshape]
    cos, sin, fc = f"cos{idx}", f"sin{idx}", f"freqs{idx}"
    if form == "flat":
        cos, sin = "cos", "sin"
    if what == "diff_tables":  # sin of the first position only: another table shape
        sin = f"sin[:, :1]{idx}" if tshape == "4d" else f"sin[:1]{idx}"
    lines = []
    r = "r"
    if token_range == "rope_first":
        lines.append(f"r = n[:, :-{ntext}]")
    elif token_range == "rest_first":
        lines.append(f"r = n[:, {ntext}:]")
    else:
        r = "n"
    f_ = ".float()" if casts else ""
    back = f".to({r}.dtype)" if casts else ""
    if form == "wan":
        c0 = "1::2" if what == "wan_offset" else "0::2"
        ch, sh = (f"{cos}[..., {c0}]", f"{sin}[..., 1::2]") if what != "wan_half_tables" else (cos, sin)
        lines += [f"x1, x2 = {r}.unflatten(-1, ({hd // 2}, 2)).unbind(-1)", f"c, s = {ch}, {sh}",
                  f"o = torch.empty_like({r})"]
        if what == "wan_swapped":
            lines += ["o[..., 0::2] = x1 * s - x2 * c", "o[..., 1::2] = x1 * c + x2 * s"]
        else:
            lines += ["o[..., 0::2] = x1 * c - x2 * s", "o[..., 1::2] = x1 * s + x2 * c"]
        lines.append(f"o = o.type_as({r})")
    elif form in ("stack", "flat"):
        if what == "odd_head":  # rope on the first 8 of 9 dims
            lines += [f"p = {r}[..., :8]", "re, im = p.reshape(*p.shape[:-1], 4, 2).unbind(-1)",
                      "rot = torch.stack([-im, re], dim=-1).flatten(3)",
                      f"o = (p{f_} * {cos} + rot{f_} * {sin}){'.to(p.dtype)' if casts else ''}",
                      f"o = torch.cat([o, {r}[..., 8:]], -1)"]
        else:
            fl = "2" if form == "flat" else "3"
            if form == "flat":
                lines.append(f"re, im = {r}.unflatten(2, ({hd // 2}, 2)).unbind(-1)")
            else:
                lines.append(f"re, im = {r}.reshape(*{r}.shape[:-1], {hd // 2}, 2).unbind(-1)")
            pair = "[im, -re]" if what == "neg_sin" else "[-im, re]"
            lines.append(f"rot = torch.stack({pair}, dim=-1).flatten({fl})")
            c, s = (sin, cos) if what == "stack_swapped" else (cos, sin)
            lines.append(f"o = ({r}{f_} * {c} + rot{f_} * {s}){back}")
    elif form == "neox":
        lines += [f"re, im = {r}.reshape(*{r}.shape[:-1], 2, {hd // 2}).unbind(-2)",
                  "rot = torch.cat([-im, re], dim=-1)", f"o = ({r}{f_} * {cos} + rot{f_} * {sin}){back}"]
    else:
        lines += [f"xc = torch.view_as_complex({r}{f_}.reshape(*{r}.shape[:-1], {hd // 2}, 2))",
                  f"o = torch.view_as_real(xc * {fc}).flatten(3)" + (f".type_as({r})" if casts else "")]
    if token_range == "rope_first":
        lines.append(f"o = torch.cat([o, n[:, -{ntext}:]], dim=1)")
    elif token_range == "rest_first":
        lines.append(f"o = torch.cat([n[:, :{ntext}], o], dim=1)")
    return lines
