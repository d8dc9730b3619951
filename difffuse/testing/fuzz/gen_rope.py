"""rope cases (a rotary embedding with no norm in front: the `rope` family), and the rope
spellings qk_norm_rope's generator shares (`SPELLINGS`, `rope_lines`, `table_args`).

Spellings (each as the code base named writes it; tables fp32 or the model's dtype, one
entry per channel or one per pair, pair-duplicated or random values, a real rotation or
any 2x2 matrix, shaped [L, w], [L, 1, w] or [1, L, 1, w]):
  stack        diffusers' `reshape(.., D/2, 2).unbind(-1)` + `stack([-im, re]).flatten`
  wan          `unflatten(-1, (D/2, 2)).unbind(-1)` + `empty_like` + strided writes,
               tables read `cos[..., 0::2]`, `sin[..., 1::2]`
  neox         `reshape(.., 2, D/2).unbind(-2)` + `cat([-im, re])`
  rh_chunk     rotate_half with `x.chunk(2, -1)` (sglang neox, new users)
  rh_slice     rotate_half with `x[..., :d//2]` / `x[..., d//2:]` slices
  unbind_half  `unflatten(-1, (-1, 2)).unbind(-1)` + stack, tables `cos[..., 0::2]`, `sin[..., 1::2]`
  sgl          even/odd strided slices `x[..., ::2]`, `x[..., 1::2]` + stack/flatten, tables
               of one entry per pair (sglang, Mochi)
  sgl_neox     `torch.chunk(x, 2, -1)` + cat, tables of one entry per pair (sglang neox)
  lightx2v     `a, b = x[..., 0::2], x[..., 1::2]` + `empty_like` + strided writes
  rotmat       2x2 matrix tables `x_ = x.reshape(.., -1, 1, 2); f[..., 0]*x_[..., 0] +
               f[..., 1]*x_[..., 1]` (ComfyUI, HiDream), `rotmat_addcmul` its `addcmul_`
               form, `rotmat_sum` `(f * x_).sum(-1)` (Kandinsky 5)
  complex      `view_as_complex(x.float()...) * freqs` (complex64)
  complex128   `view_as_complex(x.to(torch.float64)...) * freqs` -> `view_as_real(..).flatten`
               -> back to x's dtype (or `.float()`): official Wan, DiffSynth (the fp64 rule)
With `tables="pair"` the full-width forms get tables of one entry per pair and expand
them in the graph (`repeat_interleave(2, -1)` / `cat([c, c], -1)`).

Near-misses (must not match): pairs that do not match (channel j with j+2), three
channels mixed, a product of the input with itself, a table computed from the input, an
offset added inside or after, a narrowing cast between the products and the sum, cos per
token but sin per head, 4x4 block tables, a rope that computes in fp64 and returns fp64.
Free (may fuse, must then be exact; unfused, reported): cos and sin swapped, cos read at
odd offsets, sin negated.

This family's own cases: the rope reads the graph's input, a Linear, a scale or a GELU,
a norm in an earlier graph (`torch._dynamo.graph_break()` between norm and rope), per-axis
ropes on thirds of head_dim (Allegro: `chunk(3, -1)`, tables gathered by `F.embedding`),
or a rope on the first channels of head_dim with the rest passed through."""
from __future__ import annotations

from .case import Case, Draw, Expect, dims, loosest, near, param, randn, site

FAMILY = "rope"

INTERLEAVED = ("stack", "wan", "unbind_half", "sgl", "lightx2v", "rotmat", "rotmat_addcmul", "rotmat_sum",
               "complex", "complex128")
HALVES = ("neox", "rh_chunk", "rh_slice", "sgl_neox")
SPELLINGS = INTERLEAVED + HALVES
HALF_TABLES = ("sgl", "sgl_neox", "lightx2v")       # one entry per pair, as the code base passes them
FULL_TABLES = ("stack", "wan", "unbind_half", "neox", "rh_chunk", "rh_slice")
ROTMAT = ("rotmat", "rotmat_addcmul", "rotmat_sum")
COMPLEX = ("complex", "complex128")
# what: the rope's math differs from a pair rotation (and the form it is written in)
NEAR = ("skip_pair", "three_ch", "r_product", "table_of_r", "offset", "mid_cast", "diff_pos", "fp64_out",
        "rotmat4", "rope_plus")
# near-misses with a whole rope inside (`(x*cos + rot*sin) + rot2*cos`): that rope may fuse (exactly)
INNER = ("rope_plus",)
FREE = ("swapped", "odd_offset", "neg_sin")
NEAR_FORM = {"skip_pair": "stack", "three_ch": ("stack", "rh_chunk"), "rope_plus": ("stack", "rh_chunk"),
             "r_product": ("stack", "rh_chunk"),
             "table_of_r": ("stack", "rh_chunk"), "offset": ("stack", "rh_chunk", "sgl"),
             "mid_cast": ("stack", "rh_chunk", "sgl"), "diff_pos": ("stack", "rh_slice"),
             "fp64_out": ("complex128", "stack"), "rotmat4": "rotmat_sum"}
FREE_FORM = {"swapped": ("stack", "wan", "sgl", "rh_chunk"), "odd_offset": ("wan", "unbind_half"),
             "neg_sin": ("stack",)}


def form_for(d: Draw, what: str, form: str, hd: int) -> str:
    """The spelling a near-miss / free case is written in (`form` where it can be)."""
    opts = NEAR_FORM.get(what) or FREE_FORM.get(what)
    if opts is None:
        return form
    opts = (opts,) if isinstance(opts, str) else opts
    return form if form in opts else d(f"{what}_form", opts)


def near_ok(what: str, hd: int, heads: int, l: int) -> bool:
    """The near-miss is one for these sizes (else it is a rope after all)."""
    if what in ("skip_pair", "rotmat4"):
        return hd % 4 == 0 and hd >= 8  # D=4: channels (j, j+2) ARE the halves pairing
    if what == "diff_pos":
        return heads >= 2 and l >= 2
    return True


def table_args(form: str, what: str, tkind: str, rows: int, hd: int, tdt: str, tshape: str, heads: int = 1,
               prefix: str = "") -> list:
    """[(name, expr)] for the rope's inputs: cos and sin, freqs (complex) or rotm (2x2 matrices)."""
    lead = {"2d": [rows], "3d": [rows, 1], "4d": [1, rows, 1]}[tshape]
    kw = "" if tdt == "float32" else f", dtype=torch.{tdt}"
    to = "" if tdt == "float32" else f".to(torch.{tdt})"
    p = prefix

    def shp(*trail):
        return ", ".join(map(str, lead + list(trail)))
    if form in COMPLEX:
        dbl = form == "complex128" and tkind != "c64"  # complex128 x times complex64 freqs: promoted
        dt = ", dtype=torch.float64" if dbl else ""
        s = shp(hd // 2)
        return [(f"{p}freqs", f"torch.polar(torch.rand({s}{dt}) + 0.5, torch.rand({s}{dt}) * 6)")]
    if what == "rotmat4":
        return [(f"{p}rotm", randn(lead + [hd // 4, 4, 4], tdt))]
    if form in ROTMAT:
        if tkind == "random":  # any 2x2 matrix: still out[j] = x[j]*A_j + x[pair(j)]*B_j
            return [(f"{p}rotm", randn(lead + [hd // 2, 2, 2], tdt))]
        a = f"(torch.rand({shp(hd // 2)}) * 6)"
        return [(f"{p}rotm", f"(lambda a: torch.stack([a.cos(), -a.sin(), a.sin(), a.cos()], -1)"
                             f".unflatten(-1, (2, 2)){to})({a})")]
    out = []
    if form in HALF_TABLES or tkind == "pair":
        w = hd // 2
        for n, f in (("cos", "cos"), ("sin", "sin")):
            out.append((f"{p}{n}", f"(torch.rand({shp(w)}) * 6).{f}(){to}" if tkind != "random"
                        else randn(lead + [w], tdt)))
    elif tkind == "dup":
        for n, f in (("cos", "cos"), ("sin", "sin")):
            rep = "repeat_interleave(2, -1)" if form in INTERLEAVED else f"repeat({', '.join(['1'] * len(lead))}, 2)"
            out.append((f"{p}{n}", f"(torch.rand({shp(hd // 2)}) * 6).{f}().{rep}{to}"))
    else:
        out = [(f"{p}cos", randn(lead + [hd], tdt)), (f"{p}sin", randn(lead + [hd], tdt))]
    if what == "diff_pos":  # sin per head, not per token: [H, D] against cos [L.., D]
        out[1] = (f"{p}sin", randn([heads, hd], tdt) if tkind != "pair" else randn([heads, hd // 2], tdt))
    return out


def rope_lines(form: str, what: str, r: str, hd: int, idx: str, casts: bool, tkind: str = "dup",
               back: str = "to", prefix: str = "", out: str = "o") -> list:
    """Lines computing `out` = the rope of `r` (last dim hd) in `form`, with the tables named
    `{prefix}cos` / `{prefix}sin` / `{prefix}freqs` / `{prefix}rotm` indexed by `idx`."""
    p = prefix
    cos, sin, fc, fm = f"{p}cos{idx}", f"{p}sin{idx}", f"{p}freqs{idx}", f"{p}rotm{idx}"
    if what == "diff_pos":
        sin = f"{p}sin[None, None]"  # [1, 1, H, w]: per head
    F_ = ".float()" if casts else ""
    bk = {"to": f".to({r}.dtype)", "type_as": f".type_as({r})", "float": ".float()"}[back] if casts else ""
    lines = []
    if tkind == "pair" and form in FULL_TABLES:  # one entry per pair, expanded in the graph
        if form in INTERLEAVED:
            lines += [f"c_, s_ = {cos}.repeat_interleave(2, -1), {sin}.repeat_interleave(2, -1)"]
        else:
            lines += [f"c_, s_ = torch.cat([{cos}, {cos}], -1), torch.cat([{sin}, {sin}], -1)"]
        cos, sin = "c_", "s_"
    if what == "swapped":
        cos, sin = sin, cos
    h = hd // 2

    def combine(rot: str) -> list:
        """o = r*cos + rot*sin with the near-miss's change."""
        a, b = f"{r}{F_}", f"{rot}{F_}"
        if what == "r_product":
            return [f"{out} = ({a} * {cos} + {b} * {a}){bk}"]
        if what == "table_of_r":
            return [f"s2 = {sin} * {a}.pow(2).mean(-1, keepdim=True)", f"{out} = ({a} * {cos} + {b} * s2){bk}"]
        if what == "offset":  # inside the rope: x[j]*cos + x[p(j)]*sin + 0.25*cos is no pair rotation
            return [f"{out} = (({a} + 0.25) * {cos} + {b} * {sin}){bk}"]
        if what == "mid_cast":
            nd = f"({r}.dtype if {r}.dtype != torch.float32 else torch.bfloat16)"
            return [f"{out} = (({r}.float() * {cos}).to({nd}) + ({rot}.float() * {sin}).to({nd})).to({r}.dtype)"]
        if what == "fp64_out":
            return [f"{out} = {r}.double() * {cos} + {rot}.double() * {sin}"]
        return [f"{out} = ({a} * {cos} + {b} * {sin}){bk}"]

    if what == "skip_pair":  # channel j rotated with j+2 (groups of 4): not a pair of the op
        lines += [f"a_, b_ = {r}.unflatten(-1, (-1, 2, 2)).unbind(-2)",
                  "rot = torch.stack([-b_, a_], dim=-2).flatten(-3)"] + combine("rot")
    elif what in ("three_ch", "rope_plus"):  # an interleaved and a halves rotation at once: three channels
        # (rope_plus: `(x*cos + rot*sin) + rot2*cos`, a whole rope inside; three_ch: none)
        lines += [f"re, im = {r}.reshape(*{r}.shape[:-1], {h}, 2).unbind(-1)",
                  "rot_i = torch.stack([-im, re], dim=-1).flatten(-2)",
                  f"x1, x2 = {r}.chunk(2, dim=-1)", "rot_h = torch.cat((-x2, x1), dim=-1)",
                  "rot, rot2 = rot_i, rot_h" if form == "stack" else "rot, rot2 = rot_h, rot_i"]
        if what == "three_ch":
            lines += [f"{out} = ({r}{F_} * {cos} + (rot{F_} * {sin} + rot2{F_} * {cos})){bk}"]
        else:
            lines += [f"{out} = (({r}{F_} * {cos} + rot{F_} * {sin}) + rot2{F_} * {cos}){bk}"]
    elif what == "rotmat4":  # 4x4 blocks: every output reads four channels
        lines += [f"x_ = {r}{F_}.reshape(*{r}.shape[:-1], {hd // 4}, 1, 4)",
                  f"{out} = ({fm} * x_).sum(-1).reshape(*{r}.shape){bk}"]
    elif form == "stack":
        pair = "[im, -re]" if what == "neg_sin" else "[-im, re]"
        lines += [f"re, im = {r}.reshape(*{r}.shape[:-1], {h}, 2).unbind(-1)",
                  f"rot = torch.stack({pair}, dim=-1).flatten(-2)"] + combine("rot")
    elif form == "neox":
        lines += [f"re, im = {r}.reshape(*{r}.shape[:-1], 2, {h}).unbind(-2)",
                  "rot = torch.cat([-im, re], dim=-1)"] + combine("rot")
    elif form == "rh_chunk":
        lines += [f"x1, x2 = {r}.chunk(2, dim=-1)", "rot = torch.cat((-x2, x1), dim=-1)"] + combine("rot")
    elif form == "rh_slice":
        lines += [f"x1 = {r}[..., : {r}.shape[-1] // 2]", f"x2 = {r}[..., {r}.shape[-1] // 2:]",
                  "rot = torch.cat((-x2, x1), dim=-1)"] + combine("rot")
    elif form in ("wan", "unbind_half"):
        c0 = "1::2" if what == "odd_offset" else "0::2"
        split = f"({h}, 2)" if form == "wan" else "(-1, 2)"
        lines += [f"x1, x2 = {r}.unflatten(-1, {split}).unbind(-1)", f"c, s = {cos}[..., {c0}], {sin}[..., 1::2]"]
        a, b = f"x1{F_}", f"x2{F_}"
        if form == "wan":
            lines += [f"{out} = torch.empty_like({r})",
                      f"{out}[..., 0::2] = {a} * c - {b} * s", f"{out}[..., 1::2] = {a} * s + {b} * c",
                      f"{out} = {out}.type_as({r})"]
        else:
            lines += [f"{out} = torch.stack(({a} * c - {b} * s, {a} * s + {b} * c), dim=-1).flatten(-2){bk}"]
    elif form in ("sgl", "sgl_neox", "lightx2v"):
        if form == "sgl_neox":
            lines += [f"x1, x2 = torch.chunk({r}, 2, dim=-1)"]
        else:
            lines += [f"x1, x2 = {r}[..., 0::2], {r}[..., 1::2]" if form == "lightx2v"
                      else f"x1 = {r}[..., ::2]", *([] if form == "lightx2v" else [f"x2 = {r}[..., 1::2]"])]
        a, b = f"x1{F_}", f"x2{F_}"
        if what == "mid_cast":
            nd = f"({r}.dtype if {r}.dtype != torch.float32 else torch.bfloat16)"
            o1 = f"(x1.float() * {cos}).to({nd}) - (x2.float() * {sin}).to({nd})"
            o2 = f"(x2.float() * {cos}).to({nd}) + (x1.float() * {sin}).to({nd})"
            bk2 = f".to({r}.dtype)"
        else:
            off = " + 0.25" if what == "offset" else ""
            o1, o2, bk2 = f"{a} * {cos} - {b} * {sin}{off}", f"{b} * {cos} + {a} * {sin}", bk
        if form == "lightx2v":
            lines += [f"{out} = torch.empty_like({r})", f"{out}[..., 0::2] = {o1}", f"{out}[..., 1::2] = {o2}"]
        else:
            lines += [f"o1 = {o1}", f"o2 = {o2}"]
            lines += [f"{out} = torch.stack((o1, o2), dim=-1).flatten(-2){bk2}" if form == "sgl"
                      else f"{out} = torch.cat((o1, o2), dim=-1){bk2}"]
    elif form in ROTMAT:
        lines += [f"x_ = {r}{'.to(' + p + 'rotm.dtype)' if casts else ''}.reshape(*{r}.shape[:-1], {h}, 1, 2)",
                  f"f = {fm}"]
        tb = f".type_as({r})" if casts else ""
        if form == "rotmat":
            lines += [f"{out} = f[..., 0] * x_[..., 0] + f[..., 1] * x_[..., 1]"]
        elif form == "rotmat_addcmul":
            lines += [f"{out} = f[..., 0] * x_[..., 0]", f"{out}.addcmul_(f[..., 1], x_[..., 1])"]
        else:
            lines += [f"{out} = (f * x_).sum(dim=-1)"]
        lines += [f"{out} = {out}.reshape(*{r}.shape){tb}"]
    elif form == "complex":
        lines += [f"xc = torch.view_as_complex({r}.float().reshape(*{r}.shape[:-1], {h}, 2))",
                  f"{out} = torch.view_as_real(xc * {fc}).flatten(-2)" + (f".type_as({r})" if casts else "")]
    elif form == "complex128":
        if what == "fp64_out":
            bk = ""
        lines += [f"xc = torch.view_as_complex({r}.to(torch.float64).reshape(*{r}.shape[:-1], {h}, 2))",
                  f"{out} = torch.view_as_real(xc * {fc}).flatten(-2)" + (bk or "")]
    else:
        raise ValueError(form)
    return lines


def gather(name: str) -> str:
    """Allegro: a table's rows gathered by position, `F.embedding(pos, table)` -> [1, L, 1, ..]."""
    if name.endswith("freqs"):  # complex: gathered as real pairs
        return (f"{name}_g = torch.view_as_complex(F.embedding(pos, torch.view_as_real({name}).flatten(1))"
                f".unflatten(-1, (-1, 2)))[:, :, None]")
    if name.endswith("rotm"):
        return f"{name}_g = F.embedding(pos, {name}.flatten(1)).unflatten(-1, ({name}.shape[1:]))[:, :, None]"
    return f"{name}_g = F.embedding(pos, {name})[:, :, None]"


def pick_back(d: Draw, form: str) -> str:
    """How the rope's result is rounded back: `.to(x.dtype)`, `.type_as(x)`, or `.float()`
    (official Wan's `torch.stack(output).float()`: fp32 whatever x is)."""
    if form == "complex128":
        return d("back", ("to", "type_as", "float"), (3, 1, 1))
    return d("back", ("to", "type_as"), (3, 1))


# ------------------------------------------------------------------ this family's cases
SOURCES = ("input", "linear", "scale", "gelu", "graph_break", "axes", "partial")


def draw(d: Draw) -> Case:
    dtype = d("dtype", ("float32", "bfloat16", "float16"), (5, 3, 2))
    b, l = dims(d)
    heads = d("heads", (2, 1, 3))
    src = d("source", SOURCES, (3, 2, 1, 1, 2, 2, 1))
    hd = d("head_dim", (8, 4, 16, 6, 12), (4, 2, 2, 1, 1))
    if src == "axes":
        hd = d("axes_dim", (12, 24, 18))  # three parts of 4, 8 or 6 channels
    part = hd // 3 if src == "axes" else hd
    if src == "partial":
        part = hd
        hd = part + d("rest", (2, 1, 4))  # the rope on the first `part` channels, the rest passed
    kind = d("kind", ("site", "near", "free"), (5, 3, 2))
    what = d("near", NEAR) if kind == "near" else d("free", FREE) if kind == "free" else "none"
    if what == "diff_pos":
        heads, l = max(heads, 2), max(l, 2) if l else 0
    if not near_ok(what, part, heads, l) or what == "diff_pos" and src == "axes":
        kind, what = "site", "none"
    form = d("form", SPELLINGS, (3, 2, 2, 2, 2, 2, 1, 2, 1, 2, 1, 2, 2, 1))
    form = form_for(d, what, form, part)
    tkind = d("tables", ("dup", "random", "pair"), (2, 2, 1))
    if tkind == "pair" and form not in FULL_TABLES:
        tkind = "dup"
    if form == "complex128":
        tkind = d("freqs", ("c128", "c64"), (3, 1))
    tdt = d("table_dtype", ("float32", "same"), (3, 1))
    tdt = dtype if tdt == "same" else tdt
    if tdt != "float32" and what in ("fp64_out",):
        tdt = "float32"
    tshape = d("table_shape", ("2d", "3d", "4d"), (3, 2, 1))
    heads_first = d.flag("heads_first", 0.2) and what != "diff_pos" and src != "axes"
    if heads_first:
        tshape = "2d"
    if src == "axes":
        tshape = "4d"  # [1, L, 1, w]: gathered by position with F.embedding
    casts = d("rope_casts", (True, False), (3, 1))
    if form in COMPLEX or what in ("mid_cast",):
        casts = True  # view_as_complex takes fp32 / fp64 pairs only
    back = pick_back(d, form)
    both = d("q_and_k", (False, True), (2, 1))
    layout = d("layout", ("contig", "sliced", "transposed"), (6, 1, 1))
    if form in COMPLEX:
        layout = "contig"  # view_as_complex needs even strides (eager raises too)
    width = heads * hd
    idx = "[None, None]" if heads_first else {"2d": "[None, :, None]", "3d": "[None]", "4d": ""}[tshape]
    args = [("x", randn([b, l, width], dtype, layout))]
    init, body, helpers = [], [], []
    names = ("q", "k") if both else ("q",)
    ropes_per = 3 if src == "axes" else 1
    if src == "axes":
        args.append(("pos", f"torch.randint(0, {max(l, 1)}, (1, {l}))"))
        for i in range(3):
            for n, e in table_args(form, what, tkind, max(l, 1), part, tdt, "2d", heads, prefix=f"t{i}_"):
                args.append((n, e))
    else:
        args += table_args(form, what, tkind, l, part, tdt, tshape, heads)
    if src == "linear":
        init.append(f"self.proj = nn.Linear({width}, {width}, dtype=torch.{dtype})")
    if src == "graph_break":
        for nm in names:
            init.append(f"self.norm_{nm} = nn.RMSNorm({hd}, eps=1e-6, dtype=torch.{dtype})")
            init.append(f"nn.init.normal_(self.norm_{nm}.weight)")
    for nm in names:
        v = f"x * {1.0 if nm == 'q' else -0.5}"
        pre = {"input": f"({v})", "linear": f"self.proj({v})", "scale": f"(({v}) * 0.5)",
               "gelu": f"F.gelu({v})"}.get(src, f"({v})")
        body.append(f"r = {pre}.unflatten(2, ({heads}, {hd}))")
        if src == "graph_break":
            body += [f"r = self.norm_{nm}(r)", "torch._dynamo.graph_break()"]
        if heads_first:
            body.append("r = r.transpose(1, 2)")
        if src == "axes":
            body.append("parts = r.chunk(3, dim=-1)")
            for i in range(3):
                body += [gather(a) for a, _ in args if a.startswith(f"t{i}_")]
                body += rope_lines(form, what, f"parts[{i}]", part, "_g", casts, tkind, back, prefix=f"t{i}_",
                                   out=f"o{i}")
            body.append("o = torch.cat([o0, o1, o2], dim=-1)")
        elif src == "partial":
            body.append(f"p = r[..., :{part}]")
            body += rope_lines(form, what, "p", part, idx, casts, tkind, back)
            body.append(f"o = torch.cat([o, r[..., {part}:].to(o.dtype)], dim=-1)")
        else:
            body += rope_lines(form, what, "r", part, idx, casts, tkind, back)
        body.append(f"o_{nm} = o")
    body.append("return " + ", ".join(f"o_{nm}" for nm in names))
    n = len(names)
    tol = loosest(dtype, tdt)
    if form == "complex128" and back == "float":
        tol = loosest(tol, "float32")
    if what == "mid_cast":
        tol = loosest(tol, "bfloat16")
    expect = {FAMILY: site(n * ropes_per), "qk_norm_rope": near()}
    if src == "axes":  # interleaved parts may be one rope over head_dim: 1 to 3 per q/k
        expect[FAMILY] = Expect(want=n, allow=3 * n, report=n)
    if kind == "near":
        expect = {FAMILY: near(n * ropes_per if what in INNER else 0), "qk_norm_rope": near()}
    elif kind == "free":  # (Allegro's interleaved parts may be one rope: one owed per q/k)
        expect = {FAMILY: Expect(want=0, allow=n * ropes_per, report=n), "qk_norm_rope": near()}
    if 0 in (b, l):
        kind = "free"
        expect = {FAMILY: Expect(want=0, allow=n * ropes_per, report=0), "qk_norm_rope": near()}
    name = (f"{kind}:{what}/{form}/{src}/tables={tkind},{tdt},{tshape}{',heads_first' if heads_first else ''}"
            f"/casts={casts},{back}/{dtype}/B{b} L{l} H{heads} D{hd}/{layout}/{'qk' if both else 'q'}")
    for e in expect.values():  # the recogniser names what stopped each rope it saw
        e.precise = True
    return Case(FAMILY, kind, name, init, body, args, expect, tol, helpers=helpers)
