#!/usr/bin/python3
"""Analysis of enumerate's per-layer target (not a fixture generator): NAEE enumerate at keep K with four per-layer
targets, in the reference forward (fp32), on the first 64 calibration windows of 128 tokens, each
pruned model evaluated on the first 64 held-out windows against the original:
A propagate  : candidates and target on the damaged input x_d: ||F(x_d) - F_S(x_d)||   (moe-tool default)
B no-propagate: on the original input x_o:                       ||F(x_o) - F_S(x_o)||   (--no-propagate)
C orig-target : ||F(x_o) - F_S(x_d)||  (the original block output as target, candidates on damaged input)
D residual    : ||h_o_out - (h_d_mid + F_S(x_d))||  (the original layer's output stream as target)
Variant A reproduces `moe-tool prune --method enumerate` (same kept experts, same perplexity),
B its --no-propagate.
Usage: /usr/bin/python3 data/scripts/naee_targets.py validation-tiny|mixtral-tiny KEEP [OUT.json]
(about 5 minutes single-threaded). Routing as mixtral / norm_topk_prob: true, no shared expert.
"""
import itertools, json, math, os, sys, time
import torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as R
from bpe_tok import Encoder
torch.set_num_threads(1)
model = sys.argv[1]; keep = int(sys.argv[2])
D = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
tdir, tok = (f"{D}/text-validation", f"{D}/tokenizer-validation") if model == "validation-tiny" else (f"{D}/text", f"{D}/tokenizer")
cfg, W = R.load_checkpoint(f"{D}/models/{model}")
enc = Encoder.from_tokenizer_json(f"{tok}/tokenizer.json")
CTX, NW = 128, 64
cal = enc.encode(open(f"{tdir}/calib.txt").read())
held = enc.encode(open(f"{tdir}/heldout.txt").read())
Xc = torch.tensor(cal[:CTX * NW]).view(NW, CTX)
Xh = torch.tensor(held[:CTX * NW]).view(NW, CTX)
E = R.n_experts(cfg); L = cfg["num_hidden_layers"]; eps = cfg["rms_norm_eps"]; k = cfg["num_experts_per_tok"]
cos, sin = R.rope_cos_sin(CTX, R.head_dim(cfg), float(cfg.get("rope_theta", 10000.0)))

def moe_out(p, x, active, Y=None):
    B, T, H = x.shape
    xf = x.reshape(-1, H)
    rname, ename, _ = R.moe_names(cfg, p)
    logits = xf @ W[rname].T
    logits = logits.masked_fill(~active, float("-inf"))
    probs = torch.softmax(logits, -1)
    w, idx = torch.topk(probs, k, -1)
    w = w / w.sum(-1, keepdim=True)   # mixtral and norm_topk_prob families
    if Y is None:
        Y = torch.stack([R.glu_mlp(xf, *[W[n] for n in ename(e)]) for e in range(E)], 1)  # [N,E,H]
    out = (Y.gather(1, idx.unsqueeze(-1).expand(-1, -1, H)) * w.unsqueeze(-1)).sum(1)
    return out.view(B, T, H)

def experts_out(p, x):
    H = x.shape[-1]; xf = x.reshape(-1, H); _, ename, _ = R.moe_names(cfg, p)
    return torch.stack([R.glu_mlp(xf, *[W[n] for n in ename(e)]) for e in range(E)], 1)

def layer_parts(l, h):
    p = f"model.layers.{l}."
    hm = h + R.attention(cfg, W, p + "self_attn.", R.rms_norm(h, W[p + "input_layernorm.weight"], eps), cos, sin)
    x = R.rms_norm(hm, W[p + "post_attention_layernorm.weight"], eps)
    return p, hm, x

subsets = [s for s in itertools.combinations(range(E), keep)]
full = torch.ones(E, dtype=torch.bool)
results = {}
with torch.no_grad():
    for variant in "ABCD":
        t0 = time.time()
        h_o = W["model.embed_tokens.weight"][Xc]; h_d = h_o.clone()
        kept_all = []
        for l in range(L):
            p, hm_o, x_o = layer_parts(l, h_o)
            _, hm_d, x_d = layer_parts(l, h_d)
            Yo = experts_out(p, x_o); Yd = experts_out(p, x_d)
            F_o = moe_out(p, x_o, full, Yo); F_d = moe_out(p, x_d, full, Yd)
            best = None
            for s in subsets:
                act = torch.zeros(E, dtype=torch.bool); act[list(s)] = True
                if variant == "B":
                    loss = (F_o - moe_out(p, x_o, act, Yo)).pow(2).sum()
                else:
                    Fs = moe_out(p, x_d, act, Yd)
                    if variant == "A": loss = (F_d - Fs).pow(2).sum()
                    elif variant == "C": loss = (F_o - Fs).pow(2).sum()
                    else: loss = ((hm_o + F_o) - (hm_d + Fs)).pow(2).sum()
                if best is None or loss < best[0]: best = (float(loss), s)
            kept = best[1]; kept_all.append(list(kept))
            act = torch.zeros(E, dtype=torch.bool); act[list(kept)] = True
            h_o = hm_o + F_o
            h_d = hm_d + moe_out(p, x_d, act, Yd)
        # evaluate on held-out windows: pruned vs original
        def fwd(masks, ids):
            h = W["model.embed_tokens.weight"][ids]
            for l in range(L):
                p, hm, x = layer_parts(l, h)
                h = hm + moe_out(p, x, masks[l])
            return R.linear(R.rms_norm(h, W["model.norm.weight"], eps), W["lm_head.weight"])
        masks = []
        for kk in kept_all:
            a = torch.zeros(E, dtype=torch.bool); a[kk] = True; masks.append(a)
        nll0 = nll1 = kl = agree = n = 0.0
        for b in range(0, NW, 8):
            ids = Xh[b:b + 8]
            lo = torch.log_softmax(fwd([full] * L, ids).double(), -1)[:, :-1]
            lp = torch.log_softmax(fwd(masks, ids).double(), -1)[:, :-1]
            y = ids[:, 1:]
            nll0 += -lo.gather(-1, y.unsqueeze(-1)).sum().item()
            nll1 += -lp.gather(-1, y.unsqueeze(-1)).sum().item()
            kl += (lo.exp() * (lo - lp)).sum().item()
            agree += (lo.argmax(-1) == lp.argmax(-1)).sum().item()
            n += y.numel()
        r = dict(variant=variant, kept=kept_all, ppl0=math.exp(nll0 / n), ppl=math.exp(nll1 / n), kl=kl / n,
                 top1=agree / n, tokens=int(n), secs=round(time.time() - t0, 1))
        results[variant] = r
        print(json.dumps(r), flush=True)
if len(sys.argv) > 3:
    json.dump(results, open(sys.argv[3], "w"), indent=1)
