"""A small but realistic synthetic run folder, for tests that must not depend on training.

``make_synthetic_run`` writes what ``whylook train`` + ``whylook explain`` would leave
behind: ``run.json`` with an ``npz:`` data source (a tiny Keras-style npz of procedurally
drawn shapes), ``analysis/explanation.json`` (schema ``whylook.explanation/1``) and
``analysis/arrays.npz`` with every array of the contract plus the documented extras, all
mutually consistent (intensity follows METHOD Step 3 from the assignments and saliency;
confusion follows from the confidences). Optional ``finetune/`` and ``compare/`` results.

Example:
    >>> from pathlib import Path; import tempfile
    >>> run = make_synthetic_run(Path(tempfile.mkdtemp()), k=6)
    >>> sorted(p.name for p in (run / "analysis").iterdir())
    ['arrays.npz', 'explanation.json']
"""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from whylook.mapping import fit_mapping

__all__ = ["CIFAR10_CLASSES", "make_synthetic_run", "summary_data"]

#: CIFAR-10's class names in label order (the shared JPEG copy's folders, sorted).
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")


def _shape_image(rng: np.random.Generator, y: int, size: int, channels: int) -> np.ndarray:
    """A class-dependent shape (bar, cross, box, diagonal, ...) on a noisy background."""
    img = rng.integers(0, 40, (size, size)).astype(np.float64)
    s, q = size, size // 4
    j = int(rng.integers(-1, 2))
    kind = y % 6
    if kind == 0:  # ring
        yy, xx = np.mgrid[:s, :s]
        r = np.hypot(yy - s / 2 + 0.5, xx - s / 2 + 0.5)
        img[(r > s / 4) & (r < s / 4 + 2)] = 230
    elif kind == 1:  # vertical bar
        img[q:-q, s // 2 - 1 + j : s // 2 + 1 + j] = 230
    elif kind == 2:  # horizontal bar + bottom stroke
        img[q + j : q + 2 + j, q:-q] = 230
        img[-q - 2 : -q, q:-q] = 200
    elif kind == 3:  # diagonal
        for i in range(q, s - q):
            img[i, max(0, min(s - 2, i + j)) : max(0, min(s - 2, i + j)) + 2] = 230
    elif kind == 4:  # cross
        img[s // 2 - 1 : s // 2 + 1, q:-q] = 230
        img[q:-q, s // 2 - 1 : s // 2 + 1] = 230
    else:  # filled box
        img[q + j : -q + j, q:-q] = 180
    if channels == 1:
        return img.clip(0, 255).astype(np.uint8)
    tint = np.array([(y * 70) % 256, (y * 130 + 60) % 256, (y * 40 + 120) % 256]) / 255
    rgb = img[..., None] * (0.4 + 0.6 * tint) + rng.integers(0, 60, (size, size, 3))
    return rgb.clip(0, 255).astype(np.uint8)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def make_synthetic_run(
    root: Path,
    *,
    classes: list[str] | None = None,
    k: int = 8,
    grid: tuple[int, int] = (4, 4),
    channels: int = 1,
    size: int = 16,
    n_train: int = 120,
    n: int = 60,
    checkpoints: int = 6,
    finetune: bool = False,
    compare: bool = False,
    seed: int = 0,
    name: str = "run",
) -> Path:
    """Write a synthetic run folder under ``root`` and return its path.

    Args:
        root: a folder; the data npz goes to ``root/data-<name>.npz``, the run to
            ``root/<name>``.
        classes: class names (default "0" … "3"); any strings, for escaping tests.
        k: number of prototypes (at least 4).
        grid: the prototype layer's (h, w).
        channels: 1 (MNIST-like, npz x_train (N,H,W)) or 3 (CIFAR-like, (N,H,W,3)).
        size: image side H = W.
        n_train: training samples in the npz.
        n: analysis-set size (rows of arrays.npz).
        checkpoints: T+1.
        finetune, compare: also write ``finetune/finetune.json`` / ``compare/*.json``.
    """
    classes = list(classes) if classes is not None else ["0", "1", "2", "3"]
    m = len(classes)
    if k < 4 or m < 2 or n > n_train or checkpoints < 2:
        raise ValueError("need k >= 4, two classes, n <= n_train and two checkpoints")
    rng = np.random.default_rng(seed)
    root = Path(root)
    run = root / name
    (run / "analysis").mkdir(parents=True, exist_ok=True)
    (run / "checkpoints").mkdir(exist_ok=True)

    # -- data: a Keras-style npz ---------------------------------------------------------
    y_train = (np.arange(n_train) % m).astype(np.uint8 if m <= 256 else np.int64)
    x_train = np.stack([_shape_image(rng, int(y), size, channels) for y in y_train])
    y_test = (np.arange(max(m, 20)) % m).astype(y_train.dtype)
    x_test = np.stack([_shape_image(rng, int(y), size, channels) for y in y_test])
    if channels == 3:  # CIFAR's Keras labels are (N, 1)
        y_train, y_test = y_train[:, None], y_test[:, None]
    data = root / f"data-{name}.npz"
    np.savez(data, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    spec = f"npz:{data}"

    # -- checkpoints on a log schedule ---------------------------------------------------
    t1, t = checkpoints, checkpoints - 1
    total = 1000
    steps = [0] + [int(s) for s in np.round(np.geomspace(1, total, t))]
    for i in range(1, t1):  # keep them strictly increasing for tiny schedules
        steps[i] = max(steps[i], steps[i - 1] + 1)
    epochs = [s / total for s in steps]
    acc = [round(1 / m + (0.97 - 1 / m) * (i / t) ** 0.7, 4) for i in range(t1)]
    loss = [round(float(np.log(m)) * (1 - 0.9 * (i / t) ** 0.7), 4) for i in range(t1)]

    # -- analysis arrays -----------------------------------------------------------------
    sample_index = np.sort(rng.permutation(n_train)[:n]).astype(np.int64)
    labels = (y_train.reshape(-1)[sample_index]).astype(np.int64)
    h, w = grid
    imgs = x_train[sample_index].astype(np.float64)
    gray = imgs if channels == 1 else imgs.mean(axis=-1)
    # Mean image intensity per grid cell decides foreground (shape) vs background cells.
    rows = (np.arange(size) * h) // size
    cols = (np.arange(size) * w) // size
    cell = np.zeros((n, h, w))
    np.add.at(cell, (slice(None), rows[:, None], cols[None, :]), gray)
    cell /= np.bincount(rows)[:, None] * np.bincount(cols)[None, :]
    fg = cell > np.median(cell, axis=(1, 2), keepdims=True)
    rr, cc = np.mgrid[:h, :w]
    n_bg = 2
    # Each class owns `per` foreground prototypes (2 for small K; with K=128 and 10 classes
    # 12 each, so that nearly every prototype appears, as in a real run).
    per = max(2, (k - n_bg) // m)
    class_proto = n_bg + (labels[:, None, None] * per + (rr + cc)[None] % per) % (k - n_bg)
    assignments = np.where(fg, class_proto, (rr + cc)[None] % n_bg).astype(np.int16)

    growth = np.linspace(0, 1, t1)[:, None, None, None]
    noise = rng.random((t1, n, h, w))
    saliency = 0.05 * noise + growth * (fg[None] * (0.6 + 0.8 * noise))
    saliency = saliency.astype(np.float32)

    onehot = np.eye(k, dtype=np.float64)[assignments]  # (n, h, w, k)
    counts = onehot.sum(axis=(1, 2))  # (n, k)
    sums = np.einsum("tnhw,nhwk->tnk", saliency.astype(np.float64), onehot)
    intensity = np.divide(
        sums, counts[None], out=np.zeros_like(sums), where=counts[None] > 0
    ).astype(np.float32)

    logits = np.linspace(0, 5, t1)[:, None, None] * np.eye(m)[labels][None] + rng.normal(
        0, 1.0, (t1, n, m)
    )
    confidence = _softmax(logits).astype(np.float32)

    beta = rng.normal(0, 0.05, (t, k, m))
    for kk in range(2, k):  # class prototypes support their class, growing over time
        beta[:, kk, ((kk - 2) // 2) % m] += np.linspace(0.02, 0.2, t)
    unc_k, unc_a, unc_b = 2, 0, 1
    sign = np.where(np.arange(t) % 2 == 0, 1.0, -1.0)
    beta[:, unc_k, unc_a] = 0.15 * sign
    beta[:, unc_k, unc_b] = -0.15 * sign
    beta = beta.astype(np.float32)
    beta_se = np.full_like(beta, 0.05)
    beta_z = (beta / beta_se).astype(np.float32)
    groups = rng.integers(-1, 3, (t, n)).astype(np.int16)

    presence = counts > 0
    final = saliency[-1].astype(np.float64)
    mass = np.einsum("nhw,nhwk->nk", final, onehot)
    mass_share = (mass / mass.sum(axis=1, keepdims=True)).astype(np.float32)
    active = mass_share >= min(0.1, 0.6 / per)
    # Two sub-groups per class (by position in the class), a few left as noise.
    class_groups = np.full(n, -1, np.int16)
    for c in range(m):
        idx = np.nonzero(labels == c)[0]
        class_groups[idx] = np.arange(len(idx)) % 2
        class_groups[idx[::7]] = -1
    pred = confidence.argmax(axis=2)
    confusion = np.zeros((t1, m, m), np.int64)
    for i in range(t1):
        np.add.at(confusion[i], (labels, pred[i]), 1)

    arrays = {
        "sample_index": sample_index,
        "labels": labels,
        "assignments": assignments,
        "saliency": saliency,
        "intensity": intensity,
        "confidence": confidence,
        "beta": beta,
        "groups": groups,
        "beta_z": beta_z,
        "beta_se": beta_se,
        "presence": presence,
        "mass_share": mass_share,
        "active": active,
        "class_groups": class_groups,
        "confusion": confusion,
    }
    # The HDBSCAN groups' own ridge fits, as explain stores them (real fits of these arrays).
    group_fits = fit_mapping(np.diff(intensity, axis=0), np.diff(confidence, axis=0),
                             groups=groups, n_boot=20, seed=seed, min_group_size=5)
    arrays.update(group_fits.group_arrays())
    np.savez(run / "analysis" / "arrays.npz", **arrays)

    # -- explanation.json ----------------------------------------------------------------
    def pid(kk: int) -> str:
        return f"P-{kk}"

    prototypes = []
    for kk in range(k):
        by_class = {
            classes[c]: round(float(active[labels == c, kk].mean()), 4)
            for c in range(m)
            if np.any(labels == c)
        }
        top = np.argsort(-mass_share[:, kk], kind="stable")[:8]
        prototypes.append(
            {
                "id": pid(kk),
                "active_rate_by_class": by_class,
                "presence_rate": round(float(presence[:, kk].mean()), 4),
                "active_rate": round(float(active[:, kk].mean()), 4),
                "top_samples": [int(r) for r in top if presence[r, kk]],
            }
        )
    explained = []
    for c in range(m):
        idx = np.nonzero(labels == c)[0]
        rates = active[idx].mean(axis=0)
        shared = [int(kk) for kk in np.argsort(-rates, kind="stable") if rates[kk] >= 0.5][:3]
        specialized = []
        for g in (0, 1):
            gi = idx[class_groups[idx] == g]
            if len(gi):
                specialized.append(
                    {
                        "group": g,
                        "size": len(gi),
                        "prototypes": [pid(n_bg + (per * c + g) % (k - n_bg))],
                        "samples": [int(r) for r in gi[:6]],
                    }
                )
        explained.append(
            {
                "class": classes[c],
                "n": len(idx),
                "shared": [pid(kk) for kk in shared],
                "shared_strength": [round(float(rates[kk]), 4) for kk in shared],
                "specialized": specialized,
            }
        )
    swing_t = list(range(1, t))
    uncertain = [
        {
            "id": pid(unc_k),
            "classes": [classes[unc_a], classes[unc_b]],
            "swings": len(swing_t),
            "steps": [steps[s + 1] for s in swing_t],
            "checkpoints": [s + 1 for s in swing_t],
            "favoured": [classes[unc_a] if s % 2 == 0 else classes[unc_b] for s in range(t)],
        }
    ]
    order = []
    for a, b in combinations(range(m), 2):
        sep = 1 + (a * 7 + b * 3) % t
        order.append(
            {
                "pair": [classes[a], classes[b]],
                "separated_at_step": steps[sep] if (a + b) % 5 else None,
                "separated_at_checkpoint": sep if (a + b) % 5 else None,
                "distinctness": round(float(1 - sep / t1 + 0.1 * rng.random()), 6),
            }
        )
    order.sort(key=lambda e: (e["separated_at_step"] is None, e["separated_at_step"] or 0))
    explanation = {
        "schema": "whylook.explanation/1",
        "run": {"data": spec, "model": "smallcnn", "layer": "features.conv4"},
        "classes": classes,
        "checkpoints": [
            {"index": i, "step": steps[i], "epoch": epochs[i], "test_accuracy": acc[i]}
            for i in range(t1)
        ],
        "k": k,
        "k_choice": "user",
        "layer": "features.conv4",
        "grid": [h, w],
        "settings": {
            "analysis_size": n,
            "prototype_size": n,
            "seed": seed,
            "active_threshold": 0.1,
        },
        "prototypes": prototypes,
        "classes_explained": explained,
        "uncertain_prototypes": uncertain,
        "learning_order": order,
        "learning_order_correlation": {"spearman": -0.61, "p_value": 0.004, "n_pairs": len(order)},
        "patterns": {"groups_per_transition": [3] * t, "all_noise_transitions": []},
        "mapping": {"lambdas": [1.0] * t, "bootstrap": 50},
    }
    (run / "analysis" / "explanation.json").write_text(json.dumps(explanation, indent=2))

    run_json: dict[str, Any] = {
        "schema": "whylook.run/1",
        "config": {
            "data": spec,
            "model": "smallcnn",
            "epochs": 1,
            "batch_size": 32,
            "schedule": "log",
            "layer": "features.conv4",
            "lr": 0.01,
        },
        "data": spec,
        "classes": classes,
        "seeds": {"seed": seed, "data_seed": seed},
        "checkpoints": [
            {
                "index": i,
                "step": steps[i],
                "epoch": epochs[i],
                "file": f"checkpoints/ckpt-{i:04d}.safetensors",
                "test_accuracy": acc[i],
                "test_loss": loss[i],
            }
            for i in range(t1)
        ],
        "versions": {"whylook": "0.1.0", "torch": "synthetic"},
    }
    (run / "run.json").write_text(json.dumps(run_json, indent=2))

    if finetune:
        (run / "finetune").mkdir(exist_ok=True)
        rows = [
            {
                "strategy": s,
                "accuracy_mean": a,
                "accuracy_std": sd,
                "confusions_mean": cm,
                "confusions_std": cs,
                "seeds": 5,
                "pair": [classes[0], classes[1]],
            }
            for s, a, sd, cm, cs in [
                ("full>full", 0.9846, 0.0031, 9.6, 2.87),
                ("curated>curated", 0.9831, 0.0063, 9.0, 4.9),
                ("curated>full", 0.9864, 0.0012, 8.4, 1.85),
            ]
        ]
        (run / "finetune" / "finetune.json").write_text(json.dumps(rows, indent=2))
    if compare:
        (run / "compare").mkdir(exist_ok=True)
        comp = {
            "run_a": str(run),
            "run_b": "other-run",
            "beta_correlation": 0.42,
            "matches": [
                {"a": pid(i), "b": pid((i + 1) % k), "overlap": 0.5 + 0.05 * i}
                for i in range(min(k, 5))
            ],
        }
        (run / "compare" / "seed1.json").write_text(json.dumps(comp, indent=2))
    return run


def summary_data(**fields: Any) -> dict[str, Any]:
    """A minimal explanation.json of three classes a, b, c for summary tests (``fields``
    replace its entries)."""
    return {
        "classes": ["a", "b", "c"], "k": 4, "layer": "l", "grid": [2, 2],
        "checkpoints": [{}] * 3, "settings": {"analysis_size": 9},
        "classes_explained": [{"class": c, "shared": [], "specialized": []} for c in "abc"],
        "uncertain_prototypes": [], "learning_order": [{"pair": ["a", "b"]}],
        "learning_order_correlation": {"spearman": None, "p_value": None, "n_pairs": 1},
        **fields,
    }
