"""qk_norm_rope cases: q (and k) → RMSNorm (nn.RMSNorm, diffusers' RMSNorm, F.rms_norm
without weight, by hand; weight a parameter or strided `W[:, 0]`) or LayerNorm, across
heads (before `unflatten`, Wan) or per head (Flux) → rope in each diffusers spelling: Wan's
strided writes into `empty_like`, the stack form `torch.stack([-x_imag, x_real], -1).flatten(3)`
(apply_rotary_emb, use_real_unbind_dim=-1), neox `rotate_half`, complex, LTX's whole-width
rope; with or without the `.float()` casts; tables pair-duplicated or random, fp32 or
the model's dtype, shaped [L, D] (indexed `[None, :, None]`), [L, 1, D] or [1, L, 1, D];
HunyuanVideo's token range `cat([rope(n[:, :a]), n[:, a:]])` either way round; output
transposed for attention or not; and every spelling of gen_rope.py (rotate_half by chunk
or slices, sglang's strided slices with tables of one entry per pair, LightX2V's strided
writes, 2x2 rotation-matrix tables with `+`, `addcmul_` or `.sum(-1)`, unbind + stack with
`cos[..., 0::2]`, complex128 rounded back; tables of one entry per pair expanded in the graph).
Near-misses for this family: a norm over another dim, a scale / GELU / integer round trip
between norm and rope, a graph break between them, the normalised q also used outside the
rope, odd head_dim with a partial rope, a rope of a q that is not normalised (the `rope`
family may fuse those ropes: fused or reported for a scale, a GELU, no norm, a graph
break). Near-misses for both families (gen_rope.NEAR): pairs that do not match, three
channels, the input times itself, tables computed from the input, an offset, a narrowing
cast mid-rope, cos per token but sin per head, 4x4 blocks, an fp64 result. Free (may fuse,
must be exact, unfused must be reported): tables swapped or read at odd offsets (Wan's and
the other forms: still `x[j]*A_j + x[pair(j)]*B_j` with table entries, so the op reads
those entries), sin negated, cos/sin of different shapes, half-width tables given directly
to Wan's form, Wan's form on a token range."""
from __future__ import annotations

from . import gen_rope
from .case import Case, Draw, Expect, dims, loosest, near, param, randn, site

FAMILY = "qk_norm_rope"
# the rope reads something other than one norm's output (the `rope` family may take the rope)
NEAR = ("norm_dim_other", "scale_between", "gelu_between", "int_between", "used_twice", "odd_head", "no_norm",
        "graph_break")
# the rope's own math is not a pair rotation (gen_rope.NEAR): neither family may match
ROPE_NEAR = gen_rope.NEAR
FREE = ("stack_swapped", "neg_sin", "diff_tables", "wan_half_tables", "wan_token_range", "wan_swapped", "wan_offset",
        "swapped", "odd_offset")
# the spellings gen_rope writes (the old five are written here)
NEW_FORMS = ("rh_chunk", "rh_slice", "unbind_half", "sgl", "sgl_neox", "lightx2v", "rotmat", "rotmat_addcmul",
             "rotmat_sum", "complex128")


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
    what = "none"
    if kind == "near":
        what = d("near", NEAR) if d("near_of", ("context", "rope"), (1, 1)) == "context" else d("rope_near", ROPE_NEAR)
    elif kind == "free":
        what = d("free", FREE)
    if not gen_rope.near_ok(what, hd, heads, l):
        kind, what = "site", "none"
    if what == "diff_pos" and l < 2:
        kind, what = "site", "none"
    form = d("form", ("stack", "wan", "neox", "complex", "flat") + NEW_FORMS, (4, 3, 2, 2, 1) + (1,) * len(NEW_FORMS))
    if form in NEW_FORMS and hd < 4:
        hd = 4  # the recogniser's candidates: an even head_dim of 4 or more
    if what.startswith("wan_"):
        form = "wan"
    if what in ROPE_NEAR or what in ("swapped", "odd_offset"):
        form = gen_rope.form_for(d, what, form, hd)
    if what in ("stack_swapped", "neg_sin", "odd_head"):
        form = "stack"
    if what == "diff_tables" and form not in ("stack", "neox"):
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
    if form in NEW_FORMS:
        tkind = d("new_tables", ("dup", "random", "pair"), (2, 2, 1))
        if tkind == "pair" and form not in gen_rope.FULL_TABLES:
            tkind = "dup"
        if form == "complex128":
            tkind = d("freqs", ("c128", "c64"), (3, 1))
    tdt = d("table_dtype", ("float32", "same"), (3, 1))
    tdt = dtype if tdt == "same" else tdt
    if what == "fp64_out":
        tdt = "float32"
    tshape = d("table_shape", ("2d", "3d", "4d"), (3, 2, 1))
    casts = d("rope_casts", (True, False), (3, 1))
    if form == "complex" and dtype != "float32" or form == "complex128" or what == "mid_cast":
        casts = True  # view_as_complex takes fp32 / fp64 pairs only
    back = gen_rope.pick_back(d, form) if form in NEW_FORMS else "to"
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
    if form in ("complex", "complex128") and layout == "transposed":
        layout = "sliced"  # view_as_complex needs a unit last stride (eager raises too)
    if form == "complex128" and what == "no_norm":
        layout = "contig"  # ... and even strides
    eps = d("eps", (1e-6, 1e-5, 1e-3))
    width = heads * hd
    nd = width if scope == "across" else hd
    rows = l
    args = [("x", randn([b, l + ntext, width], dtype, layout))]
    if form == "flat":  # LTX: the whole q width is one head; tables [1, L, H*D] span it
        tabs = [(n, f"({e})[None]") for n, e in tables("stack", tkind, rows, width, tdt, "2d")]
    elif form in NEW_FORMS or what in ROPE_NEAR:
        tabs = gen_rope.table_args(form, what, tkind, rows, hd, tdt, tshape, heads)
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
        if what == "graph_break":  # the norm, then a graph break, then the rope
            body.append("torch._dynamo.graph_break()")
        elif what == "scale_between":
            body.append("n = n * 0.5")
        elif what == "gelu_between":
            body.append("n = F.gelu(n)")
        elif what == "int_between":
            body.append("n = (n * 4).to(torch.int32).to(n.dtype)")
        roped = rope_lines(form, what, casts, tshape, ntext, token_range, width if form == "flat" else hd, tkind, back)
        body += roped
        if what == "used_twice":
            body.append("o = o + n")
        if transpose and form != "flat":
            body.append("o = o.transpose(1, 2)")
        body.append(f"o_{nm} = o")
    body.append("return " + ", ".join(f"o_{nm}" for nm in names))

    n_sites = len(names)
    # the `rope` family takes ropes whose input is not a norm's output: never those of a site
    expect = {FAMILY: site(n_sites), "rope": near()}
    if kind == "near":
        expect = {FAMILY: near(), "rope": Expect(want=0, allow=n_sites, report=0)}  # a rope of its own: exact
        if what in ("no_norm", "scale_between", "gelu_between", "graph_break"):
            # the rope reads no norm: the rope family's site, fused or reported
            expect["rope"] = Expect(want=0, allow=n_sites, report=n_sites)
        if what == "scale_between":
            # `n * 0.5` then a rope is also "x[j]*A_j + x[p(j)]*B_j" of the norm's output with
            # A_j = 0.5*cos[j]: the recogniser may take it from the norm (exactly: a power of 2)
            expect[FAMILY] = Expect(want=0, allow=n_sites, report=0)
            expect["rope"].alt = {FAMILY: n_sites}
        if what in ROPE_NEAR:
            expect["rope"] = near()
        if what in gen_rope.INNER:  # a whole rope inside: may fuse with its norm, exactly
            expect[FAMILY] = near(n_sites)
    elif kind == "free":
        expect = {FAMILY: Expect(want=0, allow=n_sites, report=n_sites), "rope": near()}
    if 0 in (b, l):
        kind, expect = "free", {FAMILY: Expect(want=0, allow=n_sites, report=0),
                                "rope": Expect(want=0, allow=n_sites, report=0)}
    name = (f"{kind}:{what}/{form}/{norm}/{scope}/w={wform}/tables={tkind},{tdt},{tshape}/range={token_range}"
            f"/{dtype}/B{b} L{l} H{heads} D{hd}/{layout}/{'qk' if both else 'q'}")
    if what == "mid_cast":
        tol = loosest(tol, "bfloat16")
    for e in expect.values():  # the recogniser names what stopped each rope it saw
        e.precise = True
    case = Case(FAMILY, kind, name, init, body, args, expect, tol)
    # an integer cast after a site turns a last-bit difference into a unit (case.py)
    case.outliers = 0.05 if what == "int_between" else 0.0
    return case


def rope_lines(form: str, what: str, casts: bool, tshape: str, ntext: int, token_range: str, hd: int,
               tkind: str = "dup", back: str = "to") -> list:
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
    if form in NEW_FORMS or what in gen_rope.NEAR or what in ("swapped", "odd_offset"):
        lines += gen_rope.rope_lines(form, what, r, hd, {"2d": "[None, :, None]", "3d": "[None]", "4d": ""}[tshape],
                                     casts, tkind, back)
        form = "done"
    f_ = ".float()" if casts else ""
    back = f".to({r}.dtype)" if casts else ""
    if form == "done":
        pass
    elif form == "wan":
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
