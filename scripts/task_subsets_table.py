#!/usr/bin/python3
"""Task subsets on the bundled fixtures (docs/tasks.md): per-task perplexity of the task-pruned
model (prune --tasks, then eval --task) against one prune on all the tasks' text at the same
experts per layer, and the size of the shared checkpoint against one checkpoint per task.

Tasks (the fixtures' texts carry no source labels, so the split criteria are these):
  * mixtral-tiny, data/text/calib.txt (Brown): its runs of 20 sentences follow the Brown files'
    order, which is the genre order (ca press ... cj learned, ck..cr fiction); task "brown-a" is
    the first half of the runs, "brown-b" the second half (genre blocks, not genre labels).
  * validation-tiny, data/text-validation/calib.txt (nlp-corpus, sources shuffled): task "short"
    is the sentences under 60 bytes (mostly lyrics, dialogue, chat), "long" the others (prose,
    legal/UN text, questions with context).
Each task's text is cut in chunks (a Brown run; 20 sentences for nlp-corpus): even chunks
calibrate, odd chunks evaluate, so no evaluated token was calibrated on.

Usage: scripts/task_subsets_table.py [--tool build/moe-tool] [--keep 4 6] [--out /tmp/moe-tasks]
Prints a Markdown table (docs/tasks.md "Measured").
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CTX = 128
WINDOWS = 16


def run(tool, *args):
    r = subprocess.run([tool, "-q", *args], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit("failed: moe-tool " + " ".join(args) + "\n" + r.stderr)
    return r.stdout


def brown_tasks(path):
    runs = open(path, encoding="utf-8").read().strip().split("\n\n")
    half = len(runs) // 2
    return {"brown-a": runs[:half], "brown-b": runs[half:]}


def length_tasks(path):
    lines = [l for l in open(path, encoding="utf-8").read().split("\n") if l.strip()]
    out = {}
    for name, keep in (("short", lambda l: len(l.encode()) < 60), ("long", lambda l: len(l.encode()) >= 60)):
        sel = [l for l in lines if keep(l)]
        out[name] = ["\n".join(sel[i:i + 20]) for i in range(0, len(sel), 20)]
    return out


def dir_bytes(d):
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors"))


def measure(tool, fixture, model, tasks, keeps, out, method):
    os.makedirs(out, exist_ok=True)
    files = {}
    for name, chunks in tasks.items():
        cal, ev = chunks[0::2], chunks[1::2]
        files[name] = {"cal": os.path.join(out, name + ".calib.txt"), "eval": os.path.join(out, name + ".eval.txt"),
                       "stats": os.path.join(out, name + ".st")}
        open(files[name]["cal"], "w", encoding="utf-8").write("\n\n".join(cal) + "\n")
        open(files[name]["eval"], "w", encoding="utf-8").write("\n\n".join(ev) + "\n")
        run(tool, "calibrate", model, "--text", files[name]["cal"], "--ctx", str(CTX), "--windows", str(WINDOWS),
            "-o", files[name]["stats"], "--force")
    all_text = os.path.join(out, "all.calib.txt")
    open(all_text, "w", encoding="utf-8").write("".join(open(f["cal"], encoding="utf-8").read() for f in files.values()))
    all_stats = os.path.join(out, "all.st")
    # Windows drawn over the whole text ("--sample random", seed 0), so that every task is in them,
    # as many as all the tasks' statistics together.
    run(tool, "calibrate", model, "--text", all_text, "--ctx", str(CTX), "--windows", str(len(files) * WINDOWS),
        "--sample", "random", "-o", all_stats, "--force")
    # The same with as many tokens as one task's statistics: tells calibration size from task fit.
    small_stats = os.path.join(out, "all-small.st")
    run(tool, "calibrate", model, "--text", all_text, "--ctx", str(CTX), "--windows", str(WINDOWS), "--sample",
        "random", "-o", small_stats, "--force")

    def ppl(m, text, task=None):
        args = ["eval", m, "--text", text, "--ctx", str(CTX), "--max-windows", str(WINDOWS), "--json"]
        if task:
            args += ["--task", task]
        return json.loads(run(tool, *args))["perplexity"]

    rows = []
    base = {n: ppl(model, f["eval"]) for n, f in files.items()}
    for keep in keeps:
        shared = os.path.join(out, "shared-%d" % keep)
        tasks_flag = ",".join("%s=%s" % (n, f["stats"]) for n, f in files.items())
        run(tool, "prune", model, shared, "--method", method, "--keep", str(keep), "--tasks", tasks_flag, "--force")
        one = os.path.join(out, "all-%d" % keep)
        run(tool, "prune", model, one, "--method", method, "--keep", str(keep), "--stats", all_stats, "--force")
        one_small = os.path.join(out, "all-small-%d" % keep)
        run(tool, "prune", model, one_small, "--method", method, "--keep", str(keep), "--stats", small_stats, "--force")
        report = json.load(open(os.path.join(shared, "moe_tool_report.json")))["tasks"]
        unions = [l["union"] for l in report["layers"]]
        separate = 0
        for n in files:
            sep = os.path.join(out, "task-%s-%d" % (n, keep))
            run(tool, "convert", shared, sep, "--task", n, "--force")
            separate += dir_bytes(sep)
        for n, f in files.items():
            rows.append({"fixture": fixture, "keep": keep, "task": n, "ppl_input": base[n],
                         "ppl_task": ppl(shared, f["eval"], n), "ppl_all": ppl(one, f["eval"]),
                         "ppl_all_small": ppl(one_small, f["eval"]),
                         "union": unions, "written": report["experts_per_layer"],
                         "shared_bytes": dir_bytes(shared), "separate_bytes": separate, "input_bytes": dir_bytes(model)})
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tool", default=os.path.join(ROOT, "build", "moe-tool"))
    ap.add_argument("--keep", type=int, nargs="+", default=[4, 6])
    ap.add_argument("--method", default="reap")
    ap.add_argument("--out", default="/tmp/moe-tasks")
    a = ap.parse_args()
    rows = []
    rows += measure(a.tool, "mixtral-tiny", os.path.join(ROOT, "data/models/mixtral-tiny"),
                    brown_tasks(os.path.join(ROOT, "data/text/calib.txt")), a.keep, os.path.join(a.out, "mixtral"), a.method)
    rows += measure(a.tool, "validation-tiny", os.path.join(ROOT, "data/models/validation-tiny"),
                    length_tasks(os.path.join(ROOT, "data/text-validation/calib.txt")), a.keep,
                    os.path.join(a.out, "validation"), a.method)
    print("| fixture | keep | task | ppl input | ppl task-pruned (eval --task) | ppl one prune on all text | "
          "same, one task's token count | union per layer | written per layer | shared MB | separate MB (sum) | input MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| %s | %d | %s | %.2f | %.2f | %.2f | %.2f | %s | %d | %.2f | %.2f | %.2f |" % (
            r["fixture"], r["keep"], r["task"], r["ppl_input"], r["ppl_task"], r["ppl_all"], r["ppl_all_small"],
            " ".join(map(str, r["union"])), r["written"], r["shared_bytes"] / 1e6, r["separate_bytes"] / 1e6,
            r["input_bytes"] / 1e6))
    json.dump(rows, open(os.path.join(a.out, "rows.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
