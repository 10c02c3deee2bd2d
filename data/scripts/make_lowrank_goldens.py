#!/usr/bin/python3
"""Golden numbers for the low-rank factorisation core (lib/passes/lowrank.h), written from
docs/methods.md with NumPy only (float64 throughout).  Offline use only.

Usage:  /usr/bin/python3 data/scripts/make_lowrank_goldens.py
Writes data/golden/lowrank.json.

Inputs are small seeded matrices: weights are float32 values (stored exactly as doubles, so the
C++ test reads the same numbers), Gram matrices are G = X X^T in float64 from a seeded X [n, N].
Per case and per rank k the file holds the rank-k reconstruction (the product A.B: the factors
themselves are only defined up to signs) and the loss.  Definitions used here (docs/methods.md):

  svd      W = U S V^T;  W_k = U_k S_k V_k^T;  loss = ||W - W_k||_F^2
  asvd     s_j = a_j^alpha, a_j = act_scale_j raised to 1e-6 * max(act_scale) when below it;
           W diag(s) = U S V^T;  W_k = U_k S_k V_k^T diag(s)^-1;  loss = ||(W - W_k) diag(s)||_F^2
  svdllm   G is "not positive definite" when its smallest eigenvalue is <= 1e-10 * max diag(G)
           (numerically singular); then G <- G + shift I, shift = max(-lambda_min, 0) + 1e-6
           (the (-lambda_min + 1e-6) I rule); S = cholesky(G), lower;  W S = U S V^T;
           W_k = U_k S_k V_k^T S^-1 (np.linalg.solve);  loss = tr((W - W_k) G (W - W_k)^T)
  d2moe_shared_v   base W_b = sum_e w_e W_e / sum_e w_e; deltas D_e = W_e - W_b; stacked
           [D_1; ...; D_E] S with S = chol(sum_e G_e); rank-k truncation of that SVD, unwhitened;
           expert e's rank-k reconstruction is W_b + (its rows of the truncation);
           loss = sum_e tr(R_e G R_e^T), G = sum of the Grams
  mole_left   one output basis: [W_1 S_1 | ... | W_E S_E], S_e = chol(G_e); A = U_k;
           B_e = U_k^T W_e; W_e,k = A B_e;  loss = sum_e tr(R_e G_e R_e^T)
  budget   --budget over a model of 2 layers x 2 matrices (svdllm; the second layer's inputs 3x
           larger): each matrix at rank k in [1, kmax] (k (m+n) < m n) for k (m+n) parameters and
           loss = sum_{i>=k} sigma_i^2 of W S, or dense for m n parameters and loss 0; the ranks
           minimising the summed loss within floor(ratio * dense parameters), by brute force over
           every combination: once over all 4 matrices (model scope), once per layer (layer scope)
Every loss is checked here against the tail sum of squared singular values it must equal.
"""
import itertools
import json
import math
import os

import numpy as np

DATA = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(DATA, "golden", "lowrank.json")


def weights(rng, m, n, decay=0.8):
    """float32 weight [m, n] with a decaying spectrum (distinct singular values)."""
    q1, _ = np.linalg.qr(rng.standard_normal((m, m)))
    q2, _ = np.linalg.qr(rng.standard_normal((n, n)))
    p = min(m, n)
    s = 3.0 * decay ** np.arange(p) * (1 + 0.1 * rng.random(p))
    w = q1[:, :p] @ np.diag(s) @ q2[:, :p].T + 0.01 * rng.standard_normal((m, n))
    return w.astype(np.float32).astype(np.float64)


def activations(rng, n, N):
    scale = 1.0 + 3.0 * rng.random(n)
    return rng.standard_normal((n, N)) * scale[:, None]


def wloss(r, g):
    return float(np.trace(r @ g @ r.T))


def tail(s, k):
    return float(np.sum(s[k:] ** 2))


def whiten(g):
    lam = np.linalg.eigvalsh(g)[0]
    shift = 0.0
    if lam <= 1e-10 * np.max(np.diag(g)):
        shift = max(-lam, 0.0) + 1e-6
    gs = g + shift * np.eye(g.shape[0])
    return np.linalg.cholesky(gs), gs, shift


def lst(a):
    return [[float(v) for v in row] for row in a]


def check(loss, s, k):
    assert abs(loss - tail(s, k)) <= 1e-8 * max(tail(s, 0), 1e-30), (loss, tail(s, k))


def single_case(name, method, w, ranks, gram=None, act=None, alpha=0.5):
    case = {"name": name, "method": method, "w": lst(w)}
    if method == "svd":
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        right, metric = vt, np.eye(w.shape[1])
    elif method == "asvd":
        a = np.asarray(act, dtype=np.float64)
        a = np.where(a < 1e-6 * a.max(), 1e-6 * a.max(), a)
        sc = a ** alpha
        u, s, vt = np.linalg.svd(w * sc[None, :], full_matrices=False)
        right, metric = vt / sc[None, :], np.diag(sc ** 2)
        case["act_scale"] = [float(v) for v in act]
        case["alpha"] = alpha
    else:
        L, gs, shift = whiten(gram)
        u, s, vt = np.linalg.svd(w @ L, full_matrices=False)
        right = np.linalg.solve(L.T, vt.T).T  # V^T L^-1
        metric = gs
        case["gram"] = lst(gram)
        case["shift"] = shift
    case["ranks"] = []
    for k in ranks:
        wk = u[:, :k] @ np.diag(s[:k]) @ right[:k]
        loss = wloss(w - wk, metric)
        check(loss, s, k)
        case["ranks"].append({"k": k, "loss": loss, "product": lst(wk)})
    return case


def brute_force_budget(mats, budget):
    """mats: [(sigma, m, n)]; the unique loss-minimising ranks (-1 = dense) within budget."""
    options = []
    for sg, m, n in mats:
        kmax = (m * n - 1) // (m + n)
        options.append([(k * (m + n), tail(sg, k), k) for k in range(1, kmax + 1)] + [(m * n, 0.0, -1)])
    found = []
    for combo in itertools.product(*options):
        if sum(c[0] for c in combo) <= budget:
            found.append((sum(c[1] for c in combo), [c[2] for c in combo]))
    found.sort()
    assert len(found) == 1 or found[1][0] - found[0][0] > 1e-6 * found[0][0], "optimum not unique"
    return found[0][1], found[0][0]


def budget_case(rng, ratio=0.45):
    layers = []
    for scale in (1.0, 3.0):
        mats = []
        for m, n in ((12, 8), (8, 12)):
            w = weights(rng, m, n)
            x = activations(rng, n, 4 * n) * scale
            g = x @ x.T
            L, _, shift = whiten(g)
            assert shift == 0.0
            mats.append((w, g, np.linalg.svd(w @ L, compute_uv=False), m, n))
        layers.append(mats)
    every = [(sg, m, n) for layer in layers for (_, _, sg, m, n) in layer]
    dense = sum(m * n for _, m, n in every)
    model_budget = math.floor(ratio * dense)
    model_ranks, model_loss = brute_force_budget(every, model_budget)
    layer_ranks, layer_budgets, layer_loss = [], [], 0.0
    for layer in layers:
        b = math.floor(ratio * sum(m * n for (_, _, _, m, n) in layer))
        r, lo = brute_force_budget([(sg, m, n) for (_, _, sg, m, n) in layer], b)
        layer_ranks.append(r)
        layer_budgets.append(b)
        layer_loss += lo
    assert model_loss < layer_loss and model_ranks != layer_ranks[0] + layer_ranks[1], "scopes agree"
    return {"name": "budget_model_2x2", "method": "budget", "ratio": ratio,
            "layers": [[{"w": lst(w), "gram": lst(g)} for (w, g, _, _, _) in layer] for layer in layers],
            "model_budget": model_budget, "model_ranks": model_ranks, "model_loss": model_loss,
            "layer_budgets": layer_budgets, "layer_ranks": layer_ranks, "layer_loss": layer_loss}


def main():
    rng = np.random.default_rng(20261130)
    cases = []
    w = weights(rng, 12, 8)
    cases.append(single_case("svd_12x8", "svd", w, [1, 3, 5, 8]))
    cases.append(single_case("svd_8x12", "svd", weights(rng, 8, 12), [2, 4, 8]))
    act = list(np.abs(rng.standard_normal(8)) + 0.2)
    act[5] = 0.0  # a channel no token activated: raised to 1e-6 * max
    cases.append(single_case("asvd_12x8", "asvd", w, [1, 3, 5, 8], act=act, alpha=0.5))
    x = activations(rng, 8, 40)
    cases.append(single_case("svdllm_12x8", "svdllm", w, [1, 3, 5, 8], gram=x @ x.T))
    cases.append(single_case("svdllm_8x12", "svdllm", weights(rng, 8, 12), [1, 4, 8],
                             gram=(lambda y: y @ y.T)(activations(rng, 12, 50))))
    xr = activations(rng, 8, 3)  # rank 3: not positive definite
    cases.append(single_case("svdllm_rank_deficient", "svdllm", w, [2, 3, 8], gram=xr @ xr.T))

    # D²-MoE shared V: 3 experts 6x8 (stacked 18x8), frequency weights, summed Gram.
    E, m, n = 3, 6, 8
    ws = [weights(rng, m, n) for _ in range(E)]
    freq = [12.0, 30.0, 18.0]
    xs = [activations(rng, n, N) for N in (5, 9, 14)]
    grams = [xe @ xe.T for xe in xs]
    base = sum(f * we for f, we in zip(freq, ws)) / sum(freq)
    ds = [we - base for we in ws]
    L, gs, shift = whiten(sum(grams))
    assert shift == 0.0
    u, s, vt = np.linalg.svd(np.vstack(ds) @ L, full_matrices=False)
    right = np.linalg.solve(L.T, vt.T).T
    case = {"name": "d2moe_shared_v_3x6x8", "method": "d2moe_shared_v", "ws": [lst(we) for we in ws],
            "grams": [lst(g) for g in grams], "weights": freq, "base": lst(base), "ranks": []}
    for k in (1, 3, 6, 8):
        stacked = u[:, :k] @ np.diag(s[:k]) @ right[:k]
        prods = [base + stacked[e * m:(e + 1) * m] for e in range(E)]
        loss = sum(wloss(we - pe, gs) for we, pe in zip(ws, prods))
        check(loss, s, k)
        case["ranks"].append({"k": k, "loss": loss, "products": [lst(pe) for pe in prods]})
    cases.append(case)

    # MoLE, down projection: one output basis A [8, k] over 3 experts 8x5, own Grams.
    E, m, n = 3, 8, 5
    ws = [weights(rng, m, n) for _ in range(E)]
    xs = [activations(rng, n, 12) for _ in range(E)]
    grams = [xe @ xe.T for xe in xs]
    Ls = [whiten(g)[0] for g in grams]
    u, s, _ = np.linalg.svd(np.hstack([we @ Le for we, Le in zip(ws, Ls)]), full_matrices=False)
    case = {"name": "mole_left_3x8x5", "method": "mole_left", "ws": [lst(we) for we in ws],
            "grams": [lst(g) for g in grams], "ranks": []}
    for k in (1, 2, 4, 8):
        A = u[:, :k]
        prods = [A @ (A.T @ we) for we in ws]
        loss = sum(wloss(we - pe, g) for we, pe, g in zip(ws, prods, grams))
        check(loss, s, k)
        case["ranks"].append({"k": k, "loss": loss, "products": [lst(pe) for pe in prods]})
    cases.append(case)

    cases.append(budget_case(rng))

    out = {"source": "data/scripts/make_lowrank_goldens.py (NumPy float64, docs/methods.md)",
           "cases": cases}
    with open(OUT, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print("wrote", OUT, len(cases), "cases")


if __name__ == "__main__":
    main()
