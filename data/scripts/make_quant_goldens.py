#!/usr/bin/python3
"""Golden values for the quantization codecs and GPTQ (lib/quant/codec.h, lib/quant/gptq.h),
written from the formulas of docs/methods.md and the headers' definitions, independently of
the C++ code.  Offline use only.

Usage:  /usr/bin/python3 data/scripts/make_quant_goldens.py
Writes data/golden/quant.json.  RTN in NumPy; GPTQ in PyTorch, following the reference
implementation's fasterquant (dead columns, act-order, damping, cholesky / cholesky_inverse /
upper cholesky, blocks with lazy updates) with H, H^-1 and U in float64 and W and the updates in
float32 (U rounded to float32 for the updates, err = (w - q) / U_ii in float64 then rounded), as
the C++ code does.  Without torch importable the script stops.

Quantizer formulas (all arithmetic float32 unless said; f16() = round to the nearest float16):
  intN   maxq = 2^b - 1; lo = min(min x, 0), hi = max(max x, 0); sym: lo, hi = -a, a with
         a = max(-lo, hi); lo = hi = 0 -> -1, +1; scale = f16((hi - lo) / maxq) (0 -> 2^-24);
         zero = (maxq + 1) / 2 (sym) or clip(round(-lo / scale), 0, maxq);
         q = clip(round(x / scale) + zero, 0, maxq); value = scale * (q - zero); round = half even
  ternary absmean: g = f32(mean|x| in float64); hi = f16(g), lo = -hi
         minmax: lo, hi as intN (sym: -a, a; both 0: -1, +1), each f16
         t = hi if x > hi * tau, lo if x < lo * tau, else 0     (tau = 0.5 unless :tX)
         tq: d = max|x|; inv = 1 / d (0 for d = 0); t = lround(x * inv) (half away from zero),
         levels -f16(d), f16(d); groups of 256
  refit  per group, up to K rounds: levels = least squares for the trits (asym: mean of x over
         each level's trits, kept when empty; sym: s = (sum_hi x - sum_lo x) / #nonzero),
         rounded f32 -> f16; re-round the trits with the grid rule (tq: inv = 1 / f16 level);
         stop at the first round whose squared error is not lower; keep the best.
GPTQ groups: contiguous original columns; a group's parameters come from the current (updated)
values of its columns when the first of them is quantized (with act-order that need not be its
first column); per-row grids are the one-group case.
"""
import json
import os

import numpy as np

try:
    import torch
except ImportError:  # pragma: no cover
    raise SystemExit("make_quant_goldens.py needs torch for the GPTQ reference")

DATA = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(DATA, "golden", "quant.json")
F32 = np.float32


def f16(v):
    return F32(np.float16(F32(v)))


def parse(spec):
    f = spec.split(":")
    name = f[0]
    c = {"kind": "int" if name.startswith("int") else "ternary", "refit": 0, "tau": 0.5}
    if c["kind"] == "int":
        c.update(bits=int(name[3:]), group=128, sym=True)
    else:
        grid = {"ternary": "minmax"}.get(name, name[len("ternary-"):])
        c.update(grid=grid, group=256 if grid == "tq" else 0, sym=grid != "minmax")
    for o in f[1:]:
        if o == "row":
            c["group"] = 0
        elif o[0] == "g":
            c["group"] = int(o[1:])
        elif o in ("sym", "asym"):
            c["sym"] = o == "sym"
        elif o.startswith("refit"):
            c["refit"] = int(o[5:]) if len(o) > 5 else 4
        elif o[0] == "t":
            c["tau"] = float(o[1:])
    return c


def groups(cols, group):
    g = cols if group == 0 else group
    return [(j, min(cols, j + g)) for j in range(0, cols, g)]


# --- intN ------------------------------------------------------------------------------------
def int_params(x, bits, sym):
    maxq = 2**bits - 1
    lo = min(F32(x.min()), F32(0)) if x.size else F32(0)
    hi = max(F32(x.max()), F32(0)) if x.size else F32(0)
    if sym:
        a = max(-lo, hi)
        lo, hi = -a, a
    if lo == 0 and hi == 0:
        lo, hi = F32(-1), F32(1)
    scale = f16(F32(F32(hi - lo) / F32(maxq)))
    if scale == 0:
        scale = F32(2.0**-24)
    zero = (maxq + 1) // 2 if sym else int(np.clip(np.round(F32(-lo) / scale), 0, maxq))
    return scale, zero


def int_quant(x, scale, zero, bits):
    maxq = 2**bits - 1
    q = np.clip(np.round((x.astype(F32) / scale).astype(F32)) + zero, 0, maxq)
    return (scale * F32(q - zero)).astype(F32)


# --- ternary ---------------------------------------------------------------------------------
def tern_levels(x, grid, sym):
    if grid == "absmean":
        g = F32(np.mean(np.abs(x.astype(np.float64)))) if x.size else F32(0)
        hi = f16(g)
        return -hi, hi, None
    lo = min(F32(x.min()), F32(0))
    hi = max(F32(x.max()), F32(0))
    if grid == "tq":
        d = max(-lo, hi)
        inv = F32(1) / d if d != 0 else F32(0)
        return -f16(d), f16(d), inv
    if sym:
        a = max(-lo, hi)
        lo, hi = -a, a
    if lo == 0 and hi == 0:
        lo, hi = F32(-1), F32(1)
    return f16(lo), f16(hi), None


def tern_fixed(lo, hi, grid, sym):
    h = f16(F32(hi))
    l = -h if sym else f16(F32(lo))
    inv = (F32(1) / h if h != 0 else F32(0)) if grid == "tq" else None
    return l, h, inv


def tern_codes(x, lev, grid, tau):
    lo, hi, inv = lev
    x = x.astype(F32)
    if grid == "tq":
        v = (x * inv).astype(F32).astype(np.float64)
        t = np.sign(v) * np.floor(np.abs(v) + 0.5)
        return np.where(t >= 1, 2, np.where(t <= -1, 1, 0))
    tau = F32(tau)
    return np.where(x > F32(hi * tau), 2, np.where(x < F32(lo * tau), 1, 0))


def tern_values(t, lev):
    lo, hi, _ = lev
    return np.where(t == 2, hi, np.where(t == 1, lo, F32(0))).astype(F32)


def sse(x, t, lev):
    d = x.astype(np.float64) - tern_values(t, lev).astype(np.float64)
    return float(np.sum(d * d))


def refit(x, t, lev, c):
    best = sse(x, t, lev)
    cur, ct = lev, t
    for _ in range(c["refit"]):
        x64 = x.astype(np.float64)
        n1, n2 = int(np.sum(ct == 1)), int(np.sum(ct == 2))
        s1, s2 = float(np.sum(x64[ct == 1])), float(np.sum(x64[ct == 2]))
        if c["sym"]:
            if n1 + n2 > 0:
                cur = tern_fixed(0.0, (s2 - s1) / (n1 + n2), c["grid"], True)
        else:
            cur = tern_fixed(s1 / n1 if n1 else cur[0], s2 / n2 if n2 else cur[1], c["grid"], False)
        ct = tern_codes(x, cur, c["grid"], c["tau"])
        e = sse(x, ct, cur)
        if not e < best:
            break
        best, lev, t = e, cur, ct
    return t, lev


def rtn(W, c):
    out = np.zeros_like(W, dtype=F32)
    for r in range(W.shape[0]):
        for j0, j1 in groups(W.shape[1], c["group"]):
            x = W[r, j0:j1]
            if c["kind"] == "int":
                s, z = int_params(x, c["bits"], c["sym"])
                out[r, j0:j1] = int_quant(x, s, z, c["bits"])
            else:
                lev = tern_levels(x, c["grid"], c["sym"])
                t = tern_codes(x, lev, c["grid"], c["tau"])
                if c["refit"]:
                    t, lev = refit(x, t, lev, c)
                out[r, j0:j1] = tern_values(t, lev)
    return out


# --- GPTQ (torch) ----------------------------------------------------------------------------
def gptq(W, H, c, block, act_order, damp):
    rows, n = W.shape
    H = torch.tensor(H, dtype=torch.float64).clone()
    Wt = torch.tensor(W, dtype=torch.float32).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    Wt[:, dead] = 0
    diag = torch.diag(H).numpy()
    perm = np.argsort(-diag, kind="stable") if act_order else np.arange(n)
    pos = np.argsort(perm)
    Wt = Wt[:, torch.tensor(perm)].clone()
    H = H[torch.tensor(perm)][:, torch.tensor(perm)]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(n, dtype=torch.float64)
    L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    U = torch.linalg.cholesky(Hinv, upper=True)
    Uf = U.float()
    gl = n if c["group"] == 0 else c["group"]
    params = {}
    Q = torch.zeros(rows, n, dtype=torch.float32)  # original column order
    for i1 in range(0, n, block):
        i2 = min(n, i1 + block)
        Err = torch.zeros(rows, i2 - i1, dtype=torch.float32)
        for a in range(i1, i2):
            j = int(perm[a])
            g = j // gl
            if g not in params:
                cols = [int(pos[k]) for k in range(g * gl, min(n, g * gl + gl))]
                X = Wt[:, cols].numpy()
                if c["kind"] == "int":
                    params[g] = [int_params(X[r], c["bits"], c["sym"]) for r in range(rows)]
                else:
                    params[g] = [tern_levels(X[r], c["grid"], c["sym"]) for r in range(rows)]
            w = Wt[:, a].numpy().copy()
            q = np.zeros(rows, dtype=F32)
            for r in range(rows):
                if c["kind"] == "int":
                    s, z = params[g][r]
                    q[r] = int_quant(w[r:r + 1], s, z, c["bits"])[0]
                else:
                    lev = params[g][r]
                    q[r] = tern_values(tern_codes(w[r:r + 1], lev, c["grid"], c["tau"]), lev)[0]
            Q[:, j] = torch.tensor(q)
            d = float(U[a, a])
            err = torch.tensor(((w.astype(np.float64) - q.astype(np.float64)) / d).astype(F32))
            Wt[:, a + 1:i2] -= err.unsqueeze(1) * Uf[a, a + 1:i2].unsqueeze(0)
            Err[:, a - i1] = err
        Wt[:, i2:] -= Err.matmul(Uf[i1:i2, i2:])
    return Q.numpy()


def fl(a):
    return [float(v) for v in np.asarray(a, dtype=F32).ravel()]


def main():
    rng = np.random.default_rng(20261130)
    # RTN: 67 columns (not a multiple of 16, 32 or 5), an all-zero row, an all-positive row, outliers.
    W1 = (rng.standard_normal((6, 67)) * 0.05).astype(F32)
    W1[2] = 0
    W1[3] = np.abs(W1[3])
    W1[4, 7] = 0.9
    W1[5, 60] = -0.7
    W2 = (rng.standard_normal((3, 300)) * 0.02).astype(F32)  # tq: groups of 256, the last 44 wide
    W2[1, 10] = 0.3
    rtn_specs = [
        ("W1", "int8:g16:asym"), ("W1", "int8:row:sym"), ("W1", "int4:g16:sym"), ("W1", "int4:g16:asym"),
        ("W1", "int4:row:asym"), ("W1", "int3:g16:asym"), ("W1", "int3:row:sym"), ("W1", "int2:g32:sym"),
        ("W1", "int2:row:asym"), ("W1", "ternary-absmean:row"), ("W1", "ternary-absmean:g16:asym"),
        ("W1", "ternary"), ("W1", "ternary-minmax:g16:sym"), ("W1", "ternary-minmax:row:t0.4"),
        ("W1", "ternary-absmean:row:refit"), ("W1", "ternary-minmax:g16:asym:refit3"),
        ("W2", "ternary-tq"), ("W2", "ternary-tq:refit"), ("W2", "int4:g128:asym"),
    ]
    mats = {"W1": W1, "W2": W2}
    rtn_cases = [{"weight": w, "codec": s, "dequant": fl(rtn(mats[w], parse(s)))} for w, s in rtn_specs]

    # GPTQ: a 16 x 96 layer, correlated inputs, one dead input column.
    rows, n, N = 16, 96, 200
    W3 = (rng.standard_normal((rows, n)) * 0.05).astype(F32)
    mix = rng.standard_normal((n, n)) * 0.3 + np.eye(n)
    X = rng.standard_normal((N, n)) @ mix * rng.uniform(0.2, 3.0, n)
    X[:, 5] = 0
    H = X.T @ X
    gptq_specs = [
        ("int4:g32:asym", 32, False, 0.01), ("int4:g32:asym", 32, True, 0.01), ("int3:row:sym", 32, False, 0.01),
        ("int4:g32:asym", 64, True, 0.01), ("ternary-minmax:row", 32, False, 0.1), ("ternary-minmax:row", 32, True, 0.1),
    ]
    gptq_cases = [{"codec": s, "block": b, "act_order": ao, "damp": dp, "dequant": fl(gptq(W3, H, parse(s), b, ao, dp))}
                  for s, b, ao, dp in gptq_specs]

    out = {
        "source": "data/scripts/make_quant_goldens.py (NumPy RTN, torch %s GPTQ)" % torch.__version__,
        "weights": {k: {"shape": list(v.shape), "values": fl(v)} for k, v in mats.items()},
        "rtn": rtn_cases,
        "gptq_layer": {"weight": {"shape": [rows, n], "values": fl(W3)}, "hessian": [float(v) for v in H.ravel()],
                       "dead_column": 5},
        "gptq": gptq_cases,
    }
    with open(OUT, "w") as f:
        json.dump(out, f, separators=(",", ":"))
        f.write("\n")
    print("wrote", OUT, os.path.getsize(OUT), "bytes")


if __name__ == "__main__":
    main()
