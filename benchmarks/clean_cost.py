"""The cost of a clean dataset: how many human reviews, on the toy world's harder tasks,
before the reviewed images plus what `accept` takes cover 95% of the images at a true
label accuracy of 99%?

    python benchmarks/clean_cost.py                     # 2,000 images: a few minutes
    python benchmarks/clean_cost.py --images 10000      # the issue's size (2 cores: ~20 min)

Three tasks on the same pictures (the toy world's 24 colour-shape pairs, equally many):
- warm/cool with the vague descriptions (2 classes, zero-shot about 62%);
- shape (4 classes, zero-shot about 40%: CLIP's zero-shot is weak there);
- the colour-shape pairs (24 classes, zero-shot about 64%: many classes).

The pictures are ingested and predicted once through the product (ingest, predict: the
ledger keeps their embeddings; each task's zero-shot predictions are rescored from them).
Then a reviewer who is always right (the pictures' own truth) reviews in the order under
test, and `learn` runs at each point of a schedule (every 10 reviews to 50, every 25 to
300, every 50 after), as `serve --learn-every` does. The session runs on arrays, with the
product's own functions: learn's choose_lambda, fit_temperature and fit_probe (a probe is
shown only when it beats zero-shot, reviewed images get their out-of-fold prediction, as
learn stores them), the audit's class_threshold, risk.pooled_threshold, accept's fair-
sample guard (rank_test) and the out-of-set bars. At each point every trust rule is
measured against the truth:
- class: each class's threshold at the target on 30+ reviews;
- bound: accept --rule bound, one threshold for all classes with a Clopper-Pearson bound
  at 95% confidence (labelassist/trust/risk.py), each class guarded;
- risk: accept --rule risk, one threshold for all classes by conformal selection
  (risk.risk_threshold: the precision holds in expectation), taken only where at least
  --min-taken of what it selects is, each class guarded.

Orders: random (push's default order: its fair shuffle, risk.shuffle_rank); flagged (push
--order flagged: the images zero-shot flags out of set first, then the shuffle; push's
default before; flagged:N sends them after the first N of the shuffle); balanced (round robin over the
classes the shown version predicts, in the shuffle's order within each); random-uncertain (the first
--fair-reviews in the fair shuffle, then lowest margin of the version shown first). The
bound and risk rules rest on
the longest prefix of the fair shuffle that is reviewed whole, and allows for the others
reviewed (risk.py), as accept does. The cost is the first point whose dataset is clean.
Baselines in the same run: reviewing everything (95% of the images), and zero-shot's own
thresholds (no learn, random order; review what they leave below until 95% is covered).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
ORDERS = ("random", "flagged", "balanced", "random-uncertain")
RULES = ("class", "bound", "risk")
COVERAGE, ACCURACY = 0.95, 0.99


def tasks():
    from labelassist.toy.world import COLOURS, SHAPES, WARM

    return {
        "warm/cool": ({"warm": ("warm colour",), "cool": ("cool colour",)},
                      "a photo of a {} thing.", lambda c, s: "warm" if c in WARM else "cool",
                      False),
        "shape": ({s: (s,) for s in SHAPES}, "a photo of a {}.", lambda c, s: s, True),
        "pairs": ({f"{c} {s}": (f"{c} {s}",) for c in COLOURS for s in SHAPES},
                  "a photo of a {}.", lambda c, s: f"{c} {s}", False),
    }


def prepare(work: Path, n_images: int) -> dict:
    """Ingest and predict the pictures once per task; each task's arrays: embeddings x,
    zero-shot log-probabilities, similarities, truth, content hashes (learn's folds)."""
    from sqlalchemy import select

    from labelassist.db import open_database
    from labelassist.db.models import Embedding, Image, Prediction
    from labelassist.db.queries import first_paths
    from labelassist.ingest import ingest
    from labelassist.labels import LabelSet
    from labelassist.model.load import load_model
    from labelassist.model.zeroshot import build_text_classifier
    from labelassist.predict.run import ensure_model_version, predict
    from labelassist.toy.world import cached_model, write_images
    from labelassist.trust.learn import zero_shot_log_probs

    model_dir = cached_model(Path.home() / ".cache" / "labelassist", log=print)
    model = load_model(str(model_dir), device="cpu", dtype="fp32")
    ledgers = {}
    for held_out in (False, True):  # all 24 pairs; the 6 pairs never seen in training
        photos = work / ("held-out" if held_out else "photos")
        if not photos.is_dir():
            write_images(photos, n_images, seed=11, held_out_only=held_out)
        ledgers[held_out] = open_database(f"sqlite:///{photos}.db")
        ingest(ledgers[held_out], [photos])
    out = {}
    for name, (classes, template, truth_of, held_out) in tasks().items():
        db = ledgers[held_out]
        label_set = LabelSet(classes=classes, templates=(template,))
        predict(db, model, label_set)
        version = ensure_model_version(db, model, label_set)
        with db.read() as s:
            rows = s.execute(select(Prediction.image_id, Prediction.similarity).where(
                Prediction.model_version_id == version.id).order_by(Prediction.image_id)).all()
            ids = [i for i, _ in rows]
            vectors = dict(s.execute(select(Embedding.image_id, Embedding.vector).where(
                Embedding.model_key == version.model_key)).all())
            shas = dict(s.execute(select(Image.id, Image.sha256)).all())
            paths = first_paths(s, ids)
        x = np.stack([np.frombuffer(vectors[i], np.float32) for i in ids])
        names = list(classes)
        parts = [Path(paths[i]).name.split("_") for i in ids]
        out[name] = {
            "classes": names, "x": x, "keys": [shas[i] for i in ids], "ids": np.array(ids),
            "offset": zero_shot_log_probs(build_text_classifier(model, label_set), x),
            "similarity": np.array([s for _, s in rows], dtype=np.float64),
            "truth": np.array([names.index(truth_of(c, s)) for c, s, *_ in parts]),
            "pictures": "the 6 held-out pairs" if held_out else "all 24 pairs"}
    for db in ledgers.values():
        db.dispose()
    return out


def schedule(n_images: int, budget: float) -> list[int]:
    points = list(range(10, 51, 10)) + list(range(75, 301, 25))
    points += list(range(350, int(n_images * budget) + 1, 50))
    return [p for p in points if p <= n_images * budget]


def shown_probs(task: dict, reviewed: np.ndarray) -> tuple[np.ndarray, bool]:
    """What learn would store after these reviews (mirrors trust.learn.learn, on arrays):
    the probe's calibrated probabilities, out of fold for the reviewed images, when it
    beats zero-shot; else zero-shot's."""
    from labelassist.trust.learn import choose_lambda, fit_probe, fit_temperature, softmax

    probs = softmax(task["offset"])
    x, offset, y = task["x"][reviewed], task["offset"][reviewed], task["truth"][reviewed]
    if len(y) < 2 or len(set(y.tolist())) < 2:
        return probs, False
    k = len(task["classes"])
    lam, acc, oof = choose_lambda(x, offset, y, [task["keys"][i] for i in reviewed], k)
    if lam is None or not acc > float((offset.argmax(1) == y).mean()):
        return probs, False
    temperature = fit_temperature(oof, y)
    w, b = fit_probe(x, offset, y, lam, k)
    probs = softmax((task["offset"] + task["x"] @ w + b) / temperature)
    probs[reviewed] = softmax(oof / temperature)
    return probs, True


def out_of_set(task: dict, is_reviewed: np.ndarray, shown: np.ndarray) -> np.ndarray:
    """accept's out-of-set flags (trust.outofset): the zero-shot similarity of each image
    against the bar of the class the version shown predicts (`shown`)."""
    from labelassist.trust.outofset import reference_bar

    zs = task["offset"].argmax(1)
    sim, truth = task["similarity"], task["truth"]
    bars = np.full(len(task["classes"]), -np.inf)
    for c in range(len(bars)):
        bar = reference_bar(sim[is_reviewed & (truth == c)], sim[zs == c], [])
        bars[c] = -np.inf if bar.threshold is None else bar.threshold
    return sim < bars[shown]


def accepted_by(rule: str, task: dict, probs: np.ndarray, is_reviewed: np.ndarray,
                fair: np.ndarray, odd: np.ndarray, args) -> tuple[np.ndarray, int]:
    """What `accept --rule RULE` takes of the unreviewed images (before out of set), and
    what --rule risk selected (takes_enough's measure). The pooled rules calibrate on the
    fair sample's images that are not out of set (`odd`), and select among the others
    that are not."""
    from labelassist.trust.audit import class_threshold
    from labelassist.trust.risk import pooled_rule

    pred, conf = probs.argmax(1), probs.max(1)
    correct = pred == task["truth"]
    rev = is_reviewed
    thresholds, selected = np.full(len(task["classes"]), np.inf), 0
    if rule == "class":
        for c in range(len(thresholds)):
            mine = pred == c
            t = class_threshold(conf[rev & mine], correct[rev & mine], conf[mine],
                                args.target_precision, 30)["threshold"]
            thresholds[c] = np.inf if t is None else t
    else:  # risk or bound: accept's pooled rules on the fair sample
        names = np.array(task["classes"])
        cal = fair & ~odd if args.calibrate == "in-set" else fair
        out = ~fair & ~odd if args.calibrate == "in-set" else ~fair
        result = pooled_rule(rule, conf[cal], correct[cal], names[pred[cal]],
                             task["classes"], args.target_precision, level=args.confidence,
                             min_class_reviews=args.min_class_reviews,
                             min_taken=args.min_taken, chosen=conf[rev & out],
                             others=conf[out])
        selected = result.selected
        for c, name in enumerate(task["classes"]):
            t = result.per_class[name]["threshold"]
            thresholds[c] = np.inf if t is None else t
    return ~rev & (conf >= thresholds[pred]), selected


def fair_sample(task: dict, is_reviewed: np.ndarray) -> bool:
    """accept's guard: refused when reviewed and unreviewed zero-shot margins rank apart."""
    from labelassist.trust.accept import BIAS_AUC, BIAS_P, rank_test

    p = np.sort(np.exp(task["offset"]), axis=1)
    margin = p[:, -1] - p[:, -2]
    if is_reviewed.sum() < 10 or (~is_reviewed).sum() < 10:
        return True
    stats = rank_test(margin[is_reviewed], margin[~is_reviewed])
    return not (abs(stats["auc"] - 0.5) > BIAS_AUC and stats["p_value"] < BIAS_P)


def measure(task: dict, probs: np.ndarray, is_reviewed: np.ndarray, fair: np.ndarray,
            args) -> dict:
    from labelassist.trust.risk import takes_enough

    n = len(is_reviewed)
    r = int(is_reviewed.sum())
    correct = probs.argmax(1) == task["truth"]
    zs_correct = task["offset"].argmax(1) == task["truth"]
    rest = ~is_reviewed
    row = {"reviews": r, "accuracy": float(correct[rest].mean()),
           "zero_shot": float(zs_correct[rest].mean())}
    unbiased = fair_sample(task, is_reviewed)
    odd = out_of_set(task, is_reviewed, probs.argmax(1))
    for rule in args.rules.split(","):
        # the class rule needs all reviews to be a fair sample (accept's guard); the bound
        # rests on the fair sample alone, and allows for the others reviewed
        taken, selected = accepted_by(rule, task, probs, is_reviewed, fair, odd, args)
        taken &= ~odd
        if rule == "class" and not unbiased:
            taken[:] = False
        if rule == "risk" and not takes_enough(int(taken.sum()), selected, args.min_taken):
            taken[:] = False  # accept's check: under --min-taken, nothing is trusted
        a, right = int(taken.sum()), int(correct[taken].sum())
        extra = max(0, math.ceil(COVERAGE * n) - r - a)  # review the rest to 95%
        accuracy = (r + right) / (r + a) if r + a else None
        row[rule] = {"accepted": a, "precision": right / a if a else None,
                     "covered": (r + a) / n, "dataset_accuracy": accuracy,
                     "clean": (r + a) / n >= COVERAGE and accuracy >= ACCURACY,
                     "finish": r + extra if (r + extra + right) / (r + extra + a)
                     >= ACCURACY else None}
    row["fair"] = unbiased
    return row


def _with(mask: np.ndarray, ids) -> np.ndarray:
    out = mask.copy()
    out[ids] = True
    return out


def pick(order: str, task: dict, probs: np.ndarray, is_reviewed: np.ndarray, count: int,
         shuffle: np.ndarray, args) -> list[int]:
    """The next `count` images to review, from the version shown now."""
    if count <= 0:
        return []
    left = shuffle[~is_reviewed[shuffle]]
    k = len(task["classes"])
    done = int(is_reviewed.sum())
    order, _, given = order.partition(":")  # random-uncertain:500, flagged:400
    fair_reviews = int(given or args.fair_reviews)
    if order == "random-uncertain" and done < fair_reviews:
        first = left[:min(count, fair_reviews - done)].tolist()
        return first + pick(f"{order}:{fair_reviews}", task, probs, _with(is_reviewed, first),
                            count - len(first), shuffle, args)
    if order == "random":
        return left[:count].tolist()
    if order == "flagged":  # push --order flagged: the images flagged out of set first
        # (flagged:N: after the first N of the shuffle, to see what flagging first costs)
        if "flagged at push" not in task:  # zero-shot's flags, before any review
            task["flagged at push"] = out_of_set(task, np.zeros(len(task["truth"]), bool),
                                                 task["offset"].argmax(1))
        odd = task["flagged at push"]
        later = max(0, int(given or 0) - int(is_reviewed[~odd].sum()))
        fair_first = left[~odd[left]][:later]
        rest = left[~np.isin(left, fair_first)]
        return np.concatenate([fair_first, rest[odd[rest]], rest[~odd[rest]]])[:count].tolist()
    if order == "random-uncertain":
        top2 = np.sort(probs[left], axis=1)[:, -2:]
        return left[np.argsort(top2[:, 1] - top2[:, 0], kind="stable")[:count]].tolist()
    pred = probs.argmax(1)
    queues = [list(left[pred[left] == c]) for c in range(k)]
    chosen: list[int] = []
    c = int(is_reviewed.sum()) % k
    while len(chosen) < count and any(queues):
        if queues[c]:
            chosen.append(int(queues[c].pop(0)))
        c = (c + 1) % k
    return chosen


def simulate(task: dict, order: str, points: list[int], args, learn: bool = True) -> list:
    n = len(task["truth"])
    from labelassist.trust.risk import fair_prefix, shuffle_rank

    shuffle = np.lexsort((task["ids"], shuffle_rank(task["ids"])))  # push --order random
    is_reviewed = np.zeros(n, bool)
    probs, reviewed = np.exp(task["offset"]), []
    probs /= probs.sum(1, keepdims=True)
    fair = np.zeros(n, bool)  # the fair sample: none yet
    rows = [measure(task, probs, is_reviewed, fair, args)]
    rows[0]["probe"] = False
    for point in points:
        batch = pick(order, task, probs, is_reviewed, point - len(reviewed), shuffle, args)
        reviewed += batch
        is_reviewed[batch] = True
        # the fair sample, as accept --rule bound finds it: the longest prefix of push's
        # fair shuffle that is reviewed whole
        fair = fair_prefix(task["ids"], task["ids"][is_reviewed])
        if learn:
            probs, probe = shown_probs(task, np.array(reviewed))
        else:
            probe = False
        rows.append({**measure(task, probs, is_reviewed, fair, args), "probe": probe})
    return rows


def cost(rows: list[dict], rule: str) -> int | None:
    return next((r["reviews"] for r in rows if r[rule]["clean"]), None)


def finish_cost(rows: list[dict], rule: str) -> int | None:
    costs = [r[rule]["finish"] for r in rows if r[rule]["finish"] is not None]
    return min(costs) if costs else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--budget", type=float, default=0.1, help="share to review at most")
    parser.add_argument("--target-precision", type=float, default=0.99)
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--min-class-reviews", type=int, default=10)
    parser.add_argument("--min-taken", type=float, default=0.65)
    parser.add_argument("--calibrate", choices=("in-set", "all"), default="in-set",
                        help="the pooled rules' fair sample and selection: the images not "
                        "out of set (accept), or all of them (before)")
    parser.add_argument("--rules", default=",".join(RULES))
    parser.add_argument("--orders", default=",".join(ORDERS))
    parser.add_argument("--tasks", default="warm/cool,shape,pairs")
    parser.add_argument("--fair-reviews", type=int, default=400,
                        help="random-uncertain: reviews in the fair shuffle first (or name "
                        "the order random-uncertain:N)")
    parser.add_argument("--shuffle-seed", type=int, default=None, help="give the images "
                        "other ids (a permutation by this seed): another fair shuffle, as "
                        "in another workspace, to see how much one draw moves the figures")
    parser.add_argument("--work", help="keep the pictures and ledger here (reused)")
    parser.add_argument("--json", help="write every point of every run here")
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch

    torch.set_num_threads(1)  # shared machines: one core
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="clean-cost-"))
    work.mkdir(parents=True, exist_ok=True)
    data = prepare(work, args.images)
    points = schedule(args.images, args.budget)
    if args.shuffle_seed is not None:  # push's shuffle is a hash of the ids: new ids
        for task in data.values():
            task["ids"] = np.random.default_rng(args.shuffle_seed).permutation(task["ids"])
    results = {}
    for name in args.tasks.split(","):
        task = data[name]
        runs = {order: simulate(task, order, points, args) for order in args.orders.split(",")}
        runs["zero-shot"] = simulate(task, "random", points, args, learn=False)
        results[name] = runs
        print_task(name, task, runs, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def print_task(name: str, task: dict, runs: dict, args) -> None:
    n, k = len(task["truth"]), len(task["classes"])
    zs = float((task["offset"].argmax(1) == task["truth"]).mean())
    print(f"\n== {name}: {k} classes, {n:,} images, zero-shot {zs:.1%}; review everything "
          f"to 95%: {math.ceil(COVERAGE * n):,}")
    for order, rows in runs.items():
        parts = []
        for rule in args.rules.split(","):
            c, f = cost(rows, rule), finish_cost(rows, rule)
            worst = min((r[rule]["precision"] for r in rows
                         if r[rule]["precision"] is not None), default=None)
            parts.append(f"{rule}: cost {_share(c, n)}, finish {_share(f, n)}, worst "
                         f"precision {'-' if worst is None else f'{worst:.2%}'}")
        early = [r["accuracy"] - r["zero_shot"] for r in rows if 0 < r["reviews"] <= 5 * k]
        print(f"{order:>17}: " + "; ".join(parts)
              + (f"; probe - zero-shot at <=5/class: {min(early):+.1%}" if early else ""))
    rules = args.rules.split(",")
    print(f"{'curve':>17}  reviews: accuracy shown | "
          + " | ".join(f"{rule} accept (precision)" for rule in rules))
    for order, rows in runs.items():
        for r in rows:
            if r["reviews"] in (0, 50, 100, 150, 200, 300, 400, 500, 700, 1000):
                print(f"{order:>17} {r['reviews']:>6}: {r['accuracy']:6.1%} | "
                      + " | ".join(_taken(r[rule], n) for rule in rules)
                      + ("" if r["fair"] else " (biased sample: refused)"))


def _share(v: int | None, n: int) -> str:
    return "not reached" if v is None else f"{v:,} ({v / n:.1%})"


def _taken(m: dict, n: int) -> str:
    p = "-" if m["precision"] is None else f"{m['precision']:.1%}"
    return f"{m['accepted'] / n:6.1%} ({p:>6})"


if __name__ == "__main__":
    main()
