"""Are a digits model's samples recognisable? A classifier trained on the real 8x8 digits labels them.

    python benchmarks/digits_check.py runs/digits [-n 500] [--sampler ddim --steps 50]

Prints a table: the share of samples the classifier labels with confidence >= 0.9, the mean
confidence, the class histogram, and the same numbers for held-out real digits as the reference.
The classifier is scikit-learn's SVC (RBF kernel, Platt-scaled probabilities) on 1,500 real digits.
"""

from __future__ import annotations

import argparse

import numpy as np


def digit_classifier():
    """An SVC on the real digits (first 1,500 for training, the remaining 297 held out)."""
    from sklearn.svm import SVC

    from difflab.data import load_dataset

    data = load_dataset("digits")
    x = data.images.reshape(len(data.images), -1).float().numpy() / 255.0
    y = data.labels.numpy()
    clf = SVC(gamma=2.0 / 64 * 4, C=10.0, probability=True, random_state=0).fit(x[:1500], y[:1500])
    return clf, x[1500:], y[1500:]


def recognisability(clf, images01: np.ndarray) -> dict:
    """images01: (N, 64) in [0, 1]."""
    proba = clf.predict_proba(images01)
    conf = proba.max(1)
    labels = proba.argmax(1)
    return {
        "confident_share": float((conf >= 0.9).mean()),
        "mean_confidence": float(conf.mean()),
        "classes_present": int(len(np.unique(labels[conf >= 0.9]))),
        "histogram": np.bincount(labels, minlength=10).tolist(),
    }


def main() -> None:
    import difflab

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("-n", type=int, default=500)
    ap.add_argument("--sampler", default="ddim")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1000)
    args = ap.parse_args()
    clf, x_test, y_test = digit_classifier()
    samples = difflab.sample(args.run, n=args.n, sampler=args.sampler, steps=args.steps, seed=args.seed, device="cpu")
    rows = [("real (held out)", recognisability(clf, x_test)),
            (f"model ({args.sampler}, {args.steps} steps)", recognisability(clf, samples.reshape(args.n, -1).numpy()))]
    print(f"held-out accuracy of the classifier: {(clf.predict(x_test) == y_test).mean():.3f}")
    print(f"{'images':<28} {'conf>=0.9':>10} {'mean conf':>10} {'classes':>8}  histogram of labels")
    for name, r in rows:
        print(f"{name:<28} {r['confident_share']:>10.3f} {r['mean_confidence']:>10.3f} {r['classes_present']:>8}  {r['histogram']}")


if __name__ == "__main__":
    main()
