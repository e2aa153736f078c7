"""The explanation recovers planted structure.

A small CNN is trained on `whylook.synthetic.planted_dataset`: four classes, each defined
by two known motifs at random places; motif B is shared by the first two classes, and the
last class comes in two variants that share no motif (H+F or G+I). The generator records
where every motif went, so the test can check where each prototype lands.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from scipy.ndimage import binary_dilation

from whylook.explain import ExplainSettings, explain
from whylook.synthetic import PLANTED_CLASSES, planted_dataset
from whylook.train import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("planted")
    ds = planted_dataset(n_train=1600, n_test=400, seed=0)
    path = ds.save_npz(folder / "planted.npz")
    run = train(f"npz:{path}", "smallcnn", epochs=3, checkpoints=10, batch_size=32,
                seed=0, out=folder / "run", progress=False)
    assert run.checkpoints[-1].test_accuracy >= 0.95, "the model must learn the motifs"
    return ds, run.path


def _explained(planted_run, precision: str, tmp_path_factory):
    ds, run = planted_run
    copy = shutil.copytree(run, tmp_path_factory.mktemp(precision) / "run")
    result = explain(copy, k=24, analysis_size=800, progress=False,
                     settings=ExplainSettings(precision=precision))
    assert result.precision == precision
    return ds, result


@pytest.fixture(scope="module")
def planted(planted_run, tmp_path_factory):
    return _explained(planted_run, "float32", tmp_path_factory)


# bfloat16 rounds the passes (whylook/saliency.py); the shared prototypes it finds must lie
# on the same planted motifs. (The variant markers below are left to
# float32: with either precision one analysis seed in five finds none on its variant's
# motifs, bfloat16 at seed 0, float32 at seed 4; benchmarks/RESULTS.md, "bfloat16".)
@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def planted_any(planted_run, planted, request, tmp_path_factory):
    if request.param == "float32":
        return planted
    return _explained(planted_run, request.param, tmp_path_factory)


def _landing(ds, result, cls: int, proto: int, motifs, rows=None) -> float:
    """Fraction of the prototype's grid cells, over the class's samples where it is
    active, that lie on (or one cell next to) the given motifs. One cell of slack, because
    a 7x7 cell's features see a neighbourhood larger than the cell."""
    a = result.arrays
    h, w = a["assignments"].shape[1:]
    if rows is None:
        rows = np.flatnonzero(a["labels"] == cls)
    rows = rows[a["active"][rows, proto]]
    on = total = 0
    for r in rows:
        cells = a["assignments"][r] == proto
        src = a["sample_index"][r]
        mask = np.zeros((h, w), bool)
        for m in motifs:
            pix = ds.train.motif_masks[m][src]
            mask |= pix.reshape(h, pix.shape[0] // h, w, pix.shape[1] // w).any(axis=(1, 3))
        on += (cells & binary_dilation(mask)).sum()
        total += cells.sum()
    return on / max(total, 1)


def _chance(ds, result, rows, motifs) -> float:
    """Where a cell drawn at random from these analysis rows lands: the landing score of a
    prototype that ignores the motifs (about 0.4-0.5 for a class, the motifs being large)."""
    a = result.arrays
    h, w = a["assignments"].shape[1:]
    fractions = []
    for src in a["sample_index"][rows]:
        mask = np.zeros((h, w), bool)
        for m in motifs:
            pix = ds.train.motif_masks[m][src]
            mask |= pix.reshape(h, pix.shape[0] // h, w, pix.shape[1] // w).any(axis=(1, 3))
        fractions.append(binary_dilation(mask).mean())
    return float(np.mean(fractions))


def test_shared_prototypes_land_on_each_class_motifs(planted_any):
    """The strongest shared prototype of every class lies on its motifs, and so does the
    shared set as a whole, weighted by strength: far above where a motif-blind prototype
    lands. (A weak shared prototype may sit near chance: over analysis seeds 0-4 the
    two-variant class's lowest-landing one, of strength ~0.2, landed 46-87 %, a random cell
    41 %; the strongest landed 87-92 % and the strength-weighted set 84-91 %.)"""
    ds, result = planted_any
    names = list(PLANTED_CLASSES)
    for c, entry in enumerate(result.data["classes_explained"]):
        motifs = sorted({m for alt in PLANTED_CLASSES[names[c]] for m in alt})
        assert entry["shared"], f"class {names[c]} has no shared prototype"
        chance = _chance(ds, result, np.flatnonzero(result.arrays["labels"] == c), motifs)
        assert chance < 0.6
        fracs = np.array([_landing(ds, result, c, int(pid[2:]), motifs)
                          for pid in entry["shared"]])
        strength = np.array(entry["shared_strength"])
        assert fracs[0] >= 0.85, (
            f"{entry['shared'][0]}, the strongest of class {names[c]}, lands on its motifs "
            f"{fracs[0]:.0%} (chance {chance:.0%})"
        )
        weighted = float(fracs @ strength / strength.sum())
        assert weighted >= 0.8, f"class {names[c]}'s shared set lands {weighted:.0%} on its motifs"


def test_two_variant_class_gets_specialized_prototypes_for_its_variants(planted):
    ds, result = planted
    c = list(PLANTED_CLASSES).index("H+F|G+I")
    a = result.arrays
    rows_c = np.flatnonzero(a["labels"] == c)
    variants = ds.train.variants[a["sample_index"][rows_c]]
    groups = a["class_groups"][rows_c]
    entry = result.data["classes_explained"][c]
    assert entry["specialized"], "the two-variant class has no specialized prototypes"
    landings = []
    for spec in entry["specialized"]:
        in_group = groups == spec["group"]
        share = np.bincount(variants[in_group], minlength=2) / in_group.sum()
        v = int(share.argmax())
        if share[v] < 0.8:
            continue  # a group that mixes the variants says nothing about them
        own = PLANTED_CLASSES["H+F|G+I"][v]
        top = int(spec["prototypes"][0][2:])
        # It marks the variant: looked at far more often in this variant than the other.
        act = a["active"][rows_c, top]
        assert act[variants == v].mean() - act[variants != v].mean() >= 0.25
        landings.append(_landing(ds, result, c, top, own, rows_c[in_group]))
    assert landings, "no specialized group corresponds to one variant"
    # At least one variant's marker lies on that variant's own motifs, far above the ~0.4
    # of a motif-blind prototype. Not both: G and I's strokes fall in prototypes that are
    # active in every sample of the class, so G+I's marker can be context (chance-level
    # landing, measured over analysis seeds 0-4; docs/METHOD-NOTES.md, Step 6).
    assert max(landings) >= 0.8, f"no variant marker lands on its variant's motifs: {landings}"


def test_explanation_is_well_formed(planted_any):
    _, result = planted_any
    d = result.data
    k = d["k"]
    ids = {p["id"] for p in d["prototypes"]}
    assert ids == {f"P-{i}" for i in range(k)}
    for entry in d["classes_explained"]:
        assert set(entry["shared"]) <= ids
        assert entry["shared_strength"] == sorted(entry["shared_strength"], reverse=True)
    # Most prototypes are not uncertain.
    assert len({u["id"] for u in d["uncertain_prototypes"]}) <= k // 2
    assert len(d["learning_order"]) == 6
