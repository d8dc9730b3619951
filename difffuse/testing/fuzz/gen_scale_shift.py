"""scale_shift cases: AdaLN `x*(k+scale)+shift` (both operand orders of the add and of the
product, `scale+1`, any k, Wan's `.float()` ... `.type_as(h)`, ComfyUI's
`torch.addcmul(shift, x, 1 + scale)`, scale-only `x*(k+scale)`) and gated residuals
`res + x*gate` (both orders, Wan's upcasts, bf16 x times an fp32 gate with no cast node,
`torch.addcmul(res, x, gate)`), with scale/shift/gate from every
modulation source: `mod[:, i, None]`, `(table + temb).chunk(6, 1)`, `emb.chunk(n, 1)[i]`
unsqueezed, `unbind`, [1, 1, D] and [D] parameters, per token (TI2V chunk of [B, L, 6, D]),
per frame ([B, F, 1, D] against x unflattened to [B, F, L/F, D]). Near-misses:
`shift - x*(1+scale)`, `(shift + x)*(1+scale)`, k a tensor, `alpha=` on the outer add, a
generic `h + x*sigmoid(h)`, a norm-affine `x*w + b`; free (fusing is optional, the output
must stay exact): `alpha=` on the `1 + scale` add (k = alpha), `sub(.., alpha=-1)`, `x*(1+s) - shift`,
a per-row [L, 1] scale, integer and bool operands, `addcmul(.., value=2)` (`c + (2a)*b`: a
site whose a is `2x`), a scale-only `x*(1+s)` whose s is a parameter (a layer scale, left
alone)."""
from __future__ import annotations

from .case import Case, Draw, Expect, absent, dims, loosest, near, param, randn, site

FAMILY = "scale_shift"

SOURCES = ("index", "chunk", "emb_unsq", "unbind", "param111", "vec", "per_token", "per_frame")
NEAR = ("sub", "add_inside", "k_tensor", "alpha_outer", "generic_fma", "affine_not_gate", "full_scale")
FREE = ("alpha_k", "sub_alpha", "sub_shift", "per_row", "int_x", "bool_gate", "addcmul_value")


def draw(d: Draw) -> Case:
    dtype = d("dtype", ("float32", "bfloat16", "float16"), (5, 3, 2))
    mdtype = d("mod_dtype", ("float32", "same"), (2, 1))
    mdtype = dtype if mdtype == "same" else mdtype
    b, l = dims(d)
    D = d("D", (16, 13, 24, 8, 1, 0), (4, 3, 2, 2, 1, 0.3))
    form = d("form", ("adaln", "gate"))
    src = d("source", SOURCES, (3, 3, 2, 1, 1, 1, 2, 2))
    if form == "gate" and src in ("param111", "vec") and d.flag("gate_layerscale", 0.5):
        src = "vec"
    nf = 1
    if src == "per_frame":
        nf = d("frames", (2, 3, 1))
        l = nf * max(1, l // max(nf, 1)) if l else 0
    kind = d("kind", ("site", "near", "free"), (5, 3, 2))
    what = d("near", NEAR) if kind == "near" else d("free", FREE) if kind == "free" else "none"
    if what == "per_row" and l < 2:
        what = "sub_shift"
    if what in ("add_inside", "k_tensor", "alpha_k") and form == "gate":
        form = "adaln"
    if what in ("affine_not_gate", "bool_gate") and form == "adaln":
        form = "gate"
    if src == "per_frame" and what in ("per_row", "full_scale"):
        src = "index"
    layout = d("layout", ("contig", "transposed", "sliced", "batch_step"), (6, 1, 1, 1))
    shape = [b, l, D]
    args = [("x", randn(shape, dtype, layout))]
    init, body = [], []
    tol = loosest(dtype, mdtype)

    # the modulation operands: two (scale, shift) or one (gate)
    n_mod = 6
    if src in ("index", "chunk", "unbind"):
        args.append(("mod", randn([b, n_mod, D], mdtype)))
    elif src == "emb_unsq":
        args.append(("emb", randn([b, n_mod * D], mdtype)))
    elif src == "per_token":
        args.append(("mod", randn([b, l, n_mod, D], mdtype)))
    elif src == "per_frame":
        args.append(("mod", randn([b, nf, 2, D], mdtype)))
    if src == "chunk":
        init.append(param("table", [1, n_mod, D], mdtype, scale=0.25))
        body.append("c = (self.table + mod.float()).chunk(6, dim=1)")
        mods = ["c[1]", "c[0]", "c[2]"]
    elif src == "index":
        mods = ["mod[:, 1, None]", "mod[:, 0, None]", "mod[:, 2, None]"]
    elif src == "unbind":
        body.append("u = mod.unbind(1)")
        mods = ["u[1][:, None]", "u[0][:, None]", "u[2].unsqueeze(1)"]
    elif src == "emb_unsq":
        body.append("e = emb.chunk(6, dim=1)")
        mods = ["e[1][:, None, :]", "e[0].unsqueeze(1)", "e[2][:, None]"]
    elif src == "per_token":
        init.append(param("table", [1, n_mod, D], mdtype, scale=0.25))
        body.append("c = [t.squeeze(2) for t in (self.table.unsqueeze(0) + mod.float()).chunk(6, dim=2)]")
        mods = ["c[1]", "c[0]", "c[2]"]
    elif src == "per_frame":
        body.append("s, sh = mod.chunk(2, dim=2)")
        mods = ["s", "sh", "s"]
    else:
        shp = [1, 1, D] if src == "param111" else [D]
        init += [param("s", shp, mdtype), param("sh", shp, mdtype)]
        mods = ["self.s", "self.sh", "self.s"]
    scale, shift, gate = mods
    if what == "per_row":
        init.append(param("row", [l, 1], mdtype))
        scale = gate = "self.row"
    if what == "full_scale":
        args.append(("t", randn(shape, mdtype)))
        scale = gate = "t"
    xs = "x"
    if src == "per_frame":
        xs = f"x.unflatten(1, ({nf}, -1))"
        body.insert(0, f"xf = {xs}")
        xs = "xf"

    if form == "adaln":
        k = d("k", (1, 0.5, 2))
        kk = "1" if k == 1 else str(k)
        spell = d("spell", ("x*(k+s)+sh", "sh+x*(k+s)", "x*(s+k)+sh", "wan", "(k+s)*x+sh", "addcmul", "scale_only"),
                  (3, 2, 1, 2, 1, 2, 2))
        fac = f"({kk} + {scale})" if spell != "x*(s+k)+sh" else f"({scale} + {kk})"
        if what == "k_tensor":
            init.append(param("kt", [1, 1, D], mdtype))
            fac = f"(self.kt + {scale})"
        elif what == "alpha_k":
            fac = f"torch.add({scale}, {kk}, alpha={d('alpha', (3, 0.5, -1))})"
        a = xs
        if what == "int_x":
            a = f"{xs}.to(torch.int32)"
        prod = f"{a} * {fac}"
        if spell == "wan":
            prod = f"{a}.float() * {fac}"
        elif spell == "(k+s)*x+sh":
            prod = f"{fac} * {a}"
        expr = f"{prod} + {shift}" if spell != "sh+x*(k+s)" else f"{shift} + {prod}"
        if spell == "addcmul":
            expr = f"torch.addcmul({shift}, {a}, {fac})"
        elif spell == "scale_only":
            expr = prod
        if what == "sub":
            expr = f"{shift} - {prod}"
        elif what == "add_inside":
            expr = f"({shift} + {a}) * {fac}"
        elif what == "alpha_outer":
            expr = f"torch.add({shift}, {prod}, alpha={d('alpha', (2, 0.5, -1))})"
        elif what == "sub_alpha":
            expr = f"torch.sub({prod}, {shift}, alpha=-1)"
        elif what == "sub_shift":
            expr = f"{prod} - {shift}"
        elif what == "addcmul_value":
            expr = f"torch.addcmul({shift}, {a}, {fac}, value=2)"
        elif what == "generic_fma":
            expr = f"{shift} + {a} * (1 + torch.sigmoid({a}))"
        body.append(f"y = {expr}")
        if spell == "wan" or d.flag("type_as", 0.3):
            body.append("y = y.type_as(x)")
    else:
        args.append(("h", randn(shape, dtype)))
        res = "h" if src != "per_frame" else "h.unflatten(1, ({nf}, -1))".format(nf=nf)
        spell = d("spell", ("res+x*g", "res+g*x", "x*g+res", "wan_ffn", "mixed", "addcmul"), (3, 2, 1, 2, 2, 2))
        g = gate
        if what == "bool_gate":
            g = f"({gate} > 0)"
        a = xs if what != "int_x" else f"{xs}.to(torch.int32)"
        expr = {"res+x*g": f"{res} + {a} * {g}", "res+g*x": f"{res} + {g} * {a}", "x*g+res": f"{a} * {g} + {res}",
                "wan_ffn": f"({res}.float() + {a}.float() * {g})", "mixed": f"({res}.float() + {a} * {g})",
                "addcmul": f"torch.addcmul({res}, {a}, {g})"}[spell]
        if what == "sub":
            expr = f"{res} - {a} * {g}"
        elif what == "alpha_outer":
            expr = f"torch.add({res}, {a} * {g}, alpha={d('alpha', (2, 0.5, -1))})"
        elif what == "sub_alpha":
            expr = f"torch.sub({res}, {a} * {g}, alpha=-1)"
        elif what == "sub_shift":
            expr = f"{a} * {g} - {res}"
        elif what == "generic_fma":
            expr = f"{res} + {a} * torch.sigmoid({res})"
        elif what == "affine_not_gate":
            init.append(param("bias", [D], mdtype))
            expr = f"{a} * {g} + self.bias"
        elif what == "addcmul_value":
            expr = f"torch.addcmul({res}, {a}, {g}, value=2)"
        body.append(f"y = {expr}")
        if spell in ("wan_ffn", "mixed") or d.flag("type_as", 0.3):
            body.append("y = y.type_as(x)")
    if src == "per_frame":
        body.append("y = y.flatten(1, 2)")
    if kind == "site" and d.flag("int_out", 0.1):
        body.append("y = y.to(torch.int32)")  # outside the site: the nocast variant takes it
    body.append("return y")
    expect = {FAMILY: site()}
    if kind == "near":
        expect = {FAMILY: near()}
    elif kind == "free":
        # a modulation / gate the anchors can see must be reported if left unfused
        owed = what == "alpha_k" or what == "per_row" and form == "adaln"  # what the anchors see
        if form == "adaln" and spell == "scale_only":
            owed = False  # a scale-only product is anchored only as `x * (s + k)` with s a modulation
        expect = {FAMILY: Expect(want=0, allow=1, report=int(owed))}
    if 0 in shape:
        kind, expect = "free", {FAMILY: Expect(want=0, allow=1, report=0)}
    if src in ("param111", "vec") and form == "adaln" and kind == "site":
        # a [D] or [1, 1, D] scale and shift: a channel modulation, taken (test_scale_shift's
        # adaln_channel_k_half); left alone it is an affine that Inductor fuses
        expect = {FAMILY: site()}
        if spell == "scale_only":  # `x * (1 + s)` with a parameter s: a layer scale, may be left alone
            kind, expect = "free", {FAMILY: Expect(want=0, allow=1, report=0)}
    name = f"{kind}:{what}/{form}/{spell}/{src}/{dtype}/mod={mdtype}/{shape}/{layout}"
    # no rope here: a rope miss would be a spurious one (the recogniser seeing a rope in a modulation)
    expect.update({"qk_norm_rope": absent(), "rope": absent()})
    case = Case(FAMILY, kind, name, init, body, args, expect, tol)
    # an integer cast after a site turns a last-bit difference into a unit (case.py)
    case.outliers = 0.05 if "torch.int32)" in body[-2] else 0.0
    return case
