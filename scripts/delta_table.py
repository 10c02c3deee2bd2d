#!/usr/bin/env python3
"""Delta-compressed experts (quantize --method delta-ternary; docs/delta.md) against per-expert
ternary codes (quantize --method rtn --codec ternary) and the D²-MoE shared-base low-rank delta
(factorize --method delta) at the same stored bits per expert parameter, on one fixture: a markdown
row per variant with the routed experts' stored bits per parameter (inspect: every byte of their
tensors, a shared base split over its users), held-out perplexity, and `eval --against` (the input)
KL and top-1 agreement over 32 windows of 128 tokens. factorize gets --ratio = the delta-ternary
row's bits / 16 (bf16), i.e. the same stored size, calibrated on 64 windows of 128 tokens of CALIB.
Outputs go to /tmp/delta-table-<fixture>/ (removed first).

  scripts/delta_table.py MODEL CALIB HELDOUT [--densities 0.02,0.05,0.1,0.2]

The delta fixture is made by data/scripts/make_delta_fixture.py (docs/delta.md gives both commands).
"""
import argparse
import json
import os
import shutil
import subprocess

T = os.environ.get("MOE_TOOL", "build/moe-tool")


def run(*args):
    return subprocess.run([T, "-q", *args], check=True, capture_output=True, text=True).stdout


def measure(model, out, heldout):
    ins = json.loads(run("inspect", out, "--json"))
    bits = ins["tensor_classes"]["experts"]["bits_per_param"]
    ev = json.loads(run("eval", out, "--against", model, "--text", heldout, "--ctx", "128", "--max-windows", "32", "--json"))
    return bits, ev


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("calib")
    ap.add_argument("heldout")
    ap.add_argument("--densities", default="0.02,0.05,0.1,0.2")
    a = ap.parse_args()
    root = "/tmp/delta-table-" + os.path.basename(os.path.normpath(a.model))
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    ref = json.loads(run("eval", a.model, "--text", a.heldout, "--ctx", "128", "--max-windows", "32", "--json"))
    print(f"input perplexity {ref['perplexity']:.2f} (32 windows of 128 tokens of {a.heldout})\n")
    print("| method | expert bits/param | perplexity | KL (nats/token) | top-1 agreement |")
    print("|---|---|---|---|---|")

    def row(name, out):
        bits, ev = measure(a.model, out, a.heldout)
        print(f"| {name} | {bits:.3f} | {ev['perplexity']:.2f} | {ev['kl_mean']:.5f} | {ev['top1_agreement']:.4f} |", flush=True)
        return bits

    o = os.path.join(root, "ternary")
    run("quantize", a.model, o, "--method", "rtn", "--codec", "ternary", "--force")
    row("quantize rtn --codec ternary (per expert, QMoE min/0/max per row)", o)
    o = os.path.join(root, "int2")
    run("quantize", a.model, o, "--method", "rtn", "--codec", "int2:g64", "--force")
    row("quantize rtn --codec int2:g64", o)
    for d in a.densities.split(","):
        o = os.path.join(root, "delta-" + d)
        run("quantize", a.model, o, "--method", "delta-ternary", "--density", d, "--force")
        bits = row(f"quantize --method delta-ternary --density {d}", o)
        f = os.path.join(root, "d2moe-" + d)
        ratio = f"{bits / 16:.4f}"
        run("factorize", a.model, f, "--method", "delta", "--ratio", ratio, "--text", a.calib, "--ctx", "128",
            "--windows", "64", "--force")
        row(f"factorize --method delta --ratio {ratio} (D²-MoE, same size)", f)


if __name__ == "__main__":
    main()
