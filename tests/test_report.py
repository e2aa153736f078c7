"""``whylook report``: the HTML page, its figures, escaping, size and a real browser."""

from __future__ import annotations

import base64
import html as html_lib
import importlib
import importlib.util
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _synthetic_run import CIFAR10_CLASSES, make_synthetic_run
from whylook.cli import main
from whylook.errors import WhylookError
from whylook.explain import load_explanation
from whylook.report import PAGE_BUDGET_BYTES, report
from whylook.report._tables import tables
from whylook.report.patches import _pixel_mask, thumbnail

CHROMIUM = Path("/usr/bin/chromium")
CORE_SECTIONS = ["overview", "prototypes", "classes", "uncertain", "patterns", "learning-order"]
XSS = "<img src=x onerror=alert(1)>"
DATA_URI = re.compile(r'src="data:(image/(?:png|jpeg));base64,([A-Za-z0-9+/=]+)"')


def _decode_all_images(html: str) -> list[tuple[int, int]]:
    """Decode every inline image of the page; return their sizes."""
    sizes = []
    for mime, payload in DATA_URI.findall(html):
        img = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
        img.load()  # raises on a truncated or corrupt image
        assert img.format == {"image/png": "PNG", "image/jpeg": "JPEG"}[mime]
        sizes.append(img.size)
    return sizes


def _sections(html: str) -> list[str]:
    return re.findall(r'<section id="([\w-]+)"', html)


@pytest.fixture
def run(tmp_path: Path) -> Path:
    return make_synthetic_run(tmp_path, finetune=True, compare=True)


@pytest.fixture
def small_run(tmp_path: Path) -> Path:
    """Two classes: fewer figures, for tests about one behaviour of the page."""
    return make_synthetic_run(tmp_path, classes=["a", "b"], k=4, finetune=True)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One full report (every section), shared by the read-only checks of the page."""
    run = make_synthetic_run(tmp_path_factory.mktemp("rendered"), finetune=True, compare=True)
    return run, report(run)


# -- the page and its files ---------------------------------------------------------------


def test_report_writes_page_and_png_figures(rendered: tuple[Path, Path]) -> None:
    run, page = rendered
    assert page == run / "report" / "index.html"
    html = page.read_text(encoding="utf-8")
    assert _sections(html) == [*CORE_SECTIONS, "finetune", "compare"]
    sizes = _decode_all_images(html)
    # 8 prototype strips + plots + class patches: every figure is inline and decodes.
    assert len(sizes) >= 8 + 4 * 2 + 5
    assert all(w > 0 and h > 0 for w, h in sizes)
    assert "http://" not in html  # nothing to fetch
    assert "https://" not in html
    pngs = sorted((run / "report").rglob("*.png"))
    names = {p.relative_to(run / "report").as_posix() for p in pngs}
    for expected in (
        "overview-accuracy.png",
        "overview-confusion.png",
        "prototypes-active-rate.png",
        "class-000-beta.png",
        "class-000-saliency.png",
        "uncertain-P-2-0-1.png",
        "learning-order-timeline.png",
        "learning-order-scatter.png",
        "finetune-0-accuracy.png",
        "patches/prototype-P-0.png",
    ):
        assert expected in names
    for p in pngs:
        with Image.open(p) as img:
            assert img.format == "PNG"
            img.load()
    # Every prototype is in the gallery under its paper name; the finetune rows too.
    for k in range(8):
        assert f'id="proto-{k}"' in html
    assert "curated&gt;full" in html
    assert "0.9864" in html
    assert "Spearman ρ = -0.61" in html
    assert "from arrays.npz confusion[-1]" in html


def test_report_is_deterministic_and_out_folder(
    rendered: tuple[Path, Path], tmp_path: Path
) -> None:
    run, page = rendered
    other = report(run, out=tmp_path / "b")
    assert other == tmp_path / "b" / "index.html"
    assert other.read_bytes() == page.read_bytes()
    assert sorted(p.name for p in other.parent.rglob("*.png")) == sorted(
        p.name for p in page.parent.rglob("*.png"))


def test_optional_sections_skipped_and_stale_files_removed(tmp_path: Path) -> None:
    run = make_synthetic_run(tmp_path, classes=["a", "b"], k=6)
    out = run / "report"
    out.mkdir()
    (out / "class-099-beta.png").write_bytes(b"stale")  # a figure of an earlier report
    (out / "notes.png").write_bytes(b"mine")  # not a name the report writes: kept
    html = report(run).read_text(encoding="utf-8")
    assert _sections(html) == CORE_SECTIONS
    assert "Fine-tuning" not in html
    assert "Comparison" not in html
    assert not (out / "class-099-beta.png").exists()
    assert (out / "notes.png").read_bytes() == b"mine"


def test_class_without_shared_prototypes_shows_each_half_of_the_rule(small_run: Path) -> None:
    path = small_run / "analysis" / "explanation.json"
    exp = json.loads(path.read_text())
    entry = exp["classes_explained"][1]
    entry["shared"], entry["shared_strength"] = [], []
    entry["why_no_shared"] = {
        "most_active": [{"id": "P-2", "active_rate": 0.7, "support_z": -1.04,
                         "also_active_in": ["0"]}],
        "best_supported": {"id": "P-3", "active_rate": 0.25, "support_z": 5.26},
    }
    exp["settings"]["support_threshold"] = 2.277605
    path.write_text(json.dumps(exp))
    html = report(small_run).read_text(encoding="utf-8")
    section = html[html.index('<details id="class-1"'):]
    section = section[:section.index("</details>")]
    assert "Each half of the rule on its own" in section
    assert ("looked at in 70% of its samples; support z -1.0 (below 2.28); also looked at in "
            "most samples of 0") in section
    assert "support z +5.3, but looked at in only 25% of its samples" in section
    names = {p.name for p in (small_run / "report" / "patches").glob("*.png")}
    assert {"class-001-candidate-P-2.png", "class-001-candidate-P-3.png"} <= names
    assert "at all" not in section
    # Nothing looked at in most samples: said so, and a supported candidate is not "below".
    entry["why_no_shared"] = {
        "most_active": [{"id": "P-3", "active_rate": 0.46, "support_z": 8.5}],
        "activity_met": False,
        "best_supported": {"id": "P-3", "active_rate": 0.46, "support_z": 8.5},
    }
    path.write_text(json.dumps(exp))
    html = report(small_run).read_text(encoding="utf-8")
    section = html[html.index('<details id="class-1"'):]
    section = section[:section.index("</details>")]
    assert ("No prototype is looked at in most of its samples at all; those it is looked "
            "at through most:") in section
    assert "looked at in 46% of its samples; support z +8.5<" in section
    assert "but looked at in only" not in section  # P-3 is shown once
    # A damaged diagnosis is the same one-line error as any other inconsistency.
    for damage in ({"most_active": [{"id": "P-2", "active_rate": "high", "support_z": 1.0}]},
                   {"most_active": [], "best_supported": "P-3"},
                   {"most_active": [{"id": "P-2", "active_rate": 0.7, "support_z": 1.0,
                                     "also_active_in": "0"}]}):
        entry["why_no_shared"] = damage
        path.write_text(json.dumps(exp))
        with pytest.raises(WhylookError, match=r"bad why_no_shared entry.*whylook explain"):
            report(small_run)


def test_class_learned_unseen_says_so_and_a_bad_value_is_one_line(small_run: Path) -> None:
    path = small_run / "analysis" / "explanation.json"
    exp = json.loads(path.read_text())
    for entry, unseen in zip(exp["classes_explained"], [0.612, 0.1], strict=False):
        entry["learning_unseen"] = unseen
    path.write_text(json.dumps(exp))
    html = report(small_run).read_text(encoding="utf-8")

    def section(i: int) -> str:
        part = html[html.index(f'<details id="class-{i}"'):]
        return part[:part.index("</details>")]

    assert "Learning unseen: 61% of this class's learning" in section(0)
    assert "Learning unseen" not in section(1)  # below the bar: not worth a caveat
    exp["classes_explained"][0]["learning_unseen"] = 1.5
    path.write_text(json.dumps(exp))
    with pytest.raises(WhylookError, match=r"bad learning_unseen entry.*whylook explain"):
        report(small_run)


def test_uncertain_section_says_how_much_the_flagged_pairs_were_confused(
    small_run: Path,
) -> None:
    path = small_run / "analysis" / "explanation.json"
    exp = json.loads(path.read_text())
    assert exp["uncertain_prototypes"]

    def uncertain_section() -> str:
        html = report(small_run).read_text(encoding="utf-8")
        part = html[html.index('<section id="uncertain">'):]
        return part[:part.index("</section>")]

    exp["uncertain_pairs_confusion"] = {"flagged_pairs": 1, "flagged_mean": 9.0,
                                        "all_pairs_mean": 5.0, "lift": 1.8}
    path.write_text(json.dumps(exp))
    assert ("The model confused those pairs 1.80x as often as the average class pair"
            in uncertain_section())
    assert "--uncertain-null" not in uncertain_section()
    exp["uncertain_pairs_confusion"]["lift"] = 1.02
    path.write_text(json.dumps(exp))
    assert "--uncertain-null N names the entries" in uncertain_section()
    del exp["uncertain_pairs_confusion"]  # written before the check existed
    path.write_text(json.dumps(exp))
    assert "average class pair" not in uncertain_section()
    exp["uncertain_pairs_confusion"] = {"lift": "high"}
    path.write_text(json.dumps(exp))
    with pytest.raises(WhylookError, match=r"bad uncertain_pairs_confusion entry"):
        report(small_run)


def test_uncertain_section_shows_the_null_and_marks_drift_entries(small_run: Path) -> None:
    """With --uncertain-null's result in explanation.json, the section says what the rule
    flags by chance and from the average drift, and tags the entries the shuffles flagged
    too; without it, neither; a malformed result is a one-line error."""
    path = small_run / "analysis" / "explanation.json"
    exp = json.loads(path.read_text())
    first = exp["uncertain_prototypes"][0]

    def uncertain_section() -> str:
        html = report(small_run).read_text(encoding="utf-8")
        part = html[html.index('<section id="uncertain">'):]
        return part[:part.index("</section>")]

    assert "--uncertain-null" not in uncertain_section()
    assert "drift 3/4" not in uncertain_section()
    exp["uncertain_by_chance"] = {
        "draws": 4, "sign_flipped": [0, 0, 2, 0], "sign_flipped_mean": 0.5,
        "shuffled": [3, 2, 3, 3], "shuffled_mean": 2.75,
        "entries_in_shuffles": [{"id": first["id"], "classes": first["classes"],
                                 "shuffles": 3}],
    }
    path.write_text(json.dumps(exp))
    section = uncertain_section()
    assert ("Measured with --uncertain-null: by chance (confidence changes sign-flipped, 4 "
            "refits): 0.5 entries flagged on average" in section)
    assert "from the average drift alone (attention changes shuffled): 2.8" in section
    heading = section[section.index(f">{first['id']}</a>: "):]
    assert "drift 3/4" in heading[:heading.index("</h3>")]
    assert section.count("drift 3/4") == 1
    for bad in ({"draws": 4}, {"draws": 4, "sign_flipped_mean": "low", "shuffled_mean": 1.0,
                                "entries_in_shuffles": []}, [1, 2]):
        exp["uncertain_by_chance"] = bad
        path.write_text(json.dumps(exp))
        with pytest.raises(WhylookError, match=r"bad uncertain_by_chance entry"):
            report(small_run)


def test_beta_heatmap_labels_transitions_where_the_class_is_blank(
    small_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Half of class 0's samples have all-zero maps at checkpoints 1 and 2: transition 1
    (both ends blank) is labelled 50% blank for class 0; transitions 0 and 2 (one end
    only) are not."""
    from matplotlib.axes import Axes

    from whylook.report import _Builder
    from whylook.report._inputs import load

    path = small_run / "analysis" / "arrays.npz"
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    rows = np.flatnonzero(arrays["labels"] == 0)
    half = rows[: rows.size // 2]
    arrays["saliency"][1:3, half] = 0.0
    np.savez(path, **arrays)
    blank = _Builder(load(small_run)).blank
    assert blank[:, 0].tolist() == pytest.approx([0.0, half.size / rows.size]
                                                 + [0.0] * (blank.shape[0] - 2))
    assert not blank[:, 1:].any()

    labels: list[list[str]] = []
    original = Axes.set_xticks

    def spy(self, ticks, tick_labels=None, **kw):  # type: ignore[no-untyped-def]
        if tick_labels is not None:
            labels.append([str(x) for x in tick_labels])
        return original(self, ticks, tick_labels, **kw)

    monkeypatch.setattr(Axes, "set_xticks", spy)
    report(small_run)
    beta_labels = [row for row in labels if any(x.startswith("→") for x in row)]
    assert beta_labels[0][1].endswith(f"({int(100 * half.size / rows.size)}% blank)")
    assert not any("blank" in x for x in beta_labels[0][:1] + beta_labels[0][2:])
    assert not any("blank" in x for row in beta_labels[1:] for x in row)


def _drop_array(run: Path, name: str) -> None:
    """Remove one array from the run's arrays.npz (as arrays not written by whylook)."""
    path = run / "analysis" / "arrays.npz"
    with np.load(path) as npz:
        arrays = {key: npz[key] for key in npz.files if key != name}
    np.savez(path, **arrays)


def _spy(monkeypatch: pytest.MonkeyPatch, name: str) -> list[tuple[tuple, dict]]:
    """Record the calls of one figure function while still drawing it."""
    from whylook.report import figures

    calls: list[tuple[tuple, dict]] = []
    original = getattr(figures, name)

    def spy(*args, **kw):  # type: ignore[no-untyped-def]
        calls.append((args, kw))
        return original(*args, **kw)

    monkeypatch.setattr(figures, name, spy)
    return calls


def test_beta_heatmap_shows_beta_per_typical_attention_change(
    small_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _spy(monkeypatch, "beta_heatmap")
    html = report(small_run).read_text(encoding="utf-8")
    with np.load(small_run / "analysis" / "arrays.npz") as npz:
        beta, intensity = npz["beta"].astype(np.float64), npz["intensity"].astype(np.float64)
    # Closed form: each cell of class c's heatmap is beta[t, k, c] * sd_i(P^{t+1}_ik - P^t_ik).
    sd = np.stack([[np.std(intensity[t + 1, :, k] - intensity[t, :, k])
                    for k in range(beta.shape[1])] for t in range(beta.shape[0])])
    for c, (args, kw) in enumerate(calls):
        np.testing.assert_allclose(args[0], (beta[:, :, c] * sd).T, rtol=1e-6, atol=1e-12)
        assert kw["per_sd"] is True
    assert len(calls) == 2
    assert "a typical change of attention to the prototype brought" in html
    # Without the intensities (arrays not written by whylook): raw β, and no such note.
    _drop_array(small_run, "intensity")
    calls.clear()
    html = report(small_run).read_text(encoding="utf-8")
    np.testing.assert_allclose(calls[0][0][0], beta[:, :, 0].T, rtol=1e-6)
    assert calls[0][1]["per_sd"] is False
    assert "a typical change of attention to the prototype brought" not in html


def test_uncertain_plot_draws_the_accumulated_lead_it_is_decided_on(
    small_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _spy(monkeypatch, "uncertain_support")
    exp = json.loads((small_run / "analysis" / "explanation.json").read_text())
    exp["structure_settings"] = {**exp.get("structure_settings", {}), "z_threshold": 2.5}
    (small_run / "analysis" / "explanation.json").write_text(json.dumps(exp))
    html = report(small_run).read_text(encoding="utf-8")
    with np.load(small_run / "analysis" / "arrays.npz") as npz:
        beta, se = npz["beta"].astype(np.float64), npz["beta_se"].astype(np.float64)
    entry = exp["uncertain_prototypes"][0]
    k = int(entry["id"].split("-")[1])
    a, b = (exp["classes"].index(c) for c in entry["classes"])
    lead = np.cumsum(beta[:, k, a] - beta[:, k, b])
    lead_se = np.sqrt(np.cumsum(se[:, k, a] ** 2 + se[:, k, b] ** 2))
    (end_steps, lead_z, threshold, names, _, proto), _ = calls[0]
    np.testing.assert_allclose(lead_z, lead / lead_se, rtol=1e-6)
    assert (threshold, names, proto) == (2.5, tuple(entry["classes"]), entry["id"])
    assert list(end_steps) == [c["step"] for c in exp["checkpoints"]][1:]
    assert f'alt="accumulated support of {entry["id"]}' in html
    # explain stores the lead it decided on (in the errors of the lead itself, which
    # count how the two classes' coefficients co-vary): the plot draws that one.
    stored = [round(float(z), 4) for z in 1.5 * lead / lead_se]
    exp["uncertain_prototypes"][0] = {**entry, "lead_z": stored}
    (small_run / "analysis" / "explanation.json").write_text(json.dumps(exp))
    calls.clear()
    report(small_run)
    np.testing.assert_array_equal(calls[0][0][1], stored)
    # Without standard errors there is no lead to draw: the entry has no plot at all.
    exp["uncertain_prototypes"][0] = entry
    (small_run / "analysis" / "explanation.json").write_text(json.dumps(exp))
    _drop_array(small_run, "beta_se")
    calls.clear()
    html = report(small_run).read_text(encoding="utf-8")
    assert calls == []
    assert "accumulated support of" not in html


def test_overview_cautions_when_the_final_model_is_near_chance(small_run: Path) -> None:
    path = small_run / "analysis" / "arrays.npz"
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    labels, conf = arrays["labels"], arrays["confidence"]
    assert (conf[-1].argmax(axis=1) == labels).mean() >= 0.55  # this run learned
    assert '<p class="warn">Caution' not in report(small_run).read_text(encoding="utf-8")
    # Two classes: chance 50 %, the bar 55 %. Right on exactly half of the samples:
    wrong = np.arange(labels.size) % 2 == 0
    conf[-1] = np.eye(2, dtype=conf.dtype)[np.where(wrong, 1 - labels, labels)]
    arrays.pop("confusion", None)
    np.savez(path, **arrays)
    html = report(small_run).read_text(encoding="utf-8")
    assert ('<p class="warn">Caution: the final model is right on 50% of the analysis set '
            "(chance: 50%); it has learned little") in html


@pytest.mark.parametrize(("source", "clause"), [("train", False), ("import", True),
                                               (None, True)])
def test_overview_caution_names_inputs_only_for_imported_runs(
    small_run: Path, source: str | None, clause: bool
) -> None:
    """A run whylook trained saw the very pixels the analysis feeds it; checkpoints from
    the user's training (or of a run.json that does not say) may expect other inputs."""
    path = small_run / "analysis" / "arrays.npz"
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    labels = arrays["labels"]
    wrong = np.arange(labels.size) % 2 == 0  # right on half: chance for two classes
    arrays["confidence"][-1] = np.eye(2, dtype=arrays["confidence"].dtype)[
        np.where(wrong, 1 - labels, labels)]
    arrays.pop("confusion", None)
    np.savez(path, **arrays)
    manifest = json.loads((small_run / "run.json").read_text())
    if source is None:
        manifest.pop("source", None)
    else:
        manifest["source"] = source
    (small_run / "run.json").write_text(json.dumps(manifest))
    html = report(small_run).read_text(encoding="utf-8")
    assert ('<p class="warn">Caution: the final model is right on 50% of the analysis set '
            "(chance: 50%); it has learned little") in html
    assert ("normalisation must be inside the model" in html) is clause


def test_learning_order_gives_no_correlation_of_fewer_than_three_separated_pairs(
    small_run: Path,
) -> None:
    """Two classes, one pair: a coefficient in a file written before structure left it out
    is not shown."""
    exp = json.loads((small_run / "analysis" / "explanation.json").read_text())
    assert [e["separated_at_step"] is not None for e in exp["learning_order"]] == [True]
    assert exp["learning_order_correlation"]["spearman"] == -0.61
    html = report(small_run).read_text(encoding="utf-8")
    assert "Spearman ρ undefined (too few separated pairs: 1, at least 3 needed)" in html
    assert "Spearman ρ = " not in html


def test_confusion_recomputed_and_labelled_when_not_stored(
    small_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _spy(monkeypatch, "confusion")
    path = small_run / "analysis" / "arrays.npz"
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files if k not in {"confusion", "mass_share"}}
    np.savez(path, **arrays)
    html = report(small_run).read_text(encoding="utf-8")
    assert "recomputed from the stored confidences" in html
    _decode_all_images(html)
    # The matrix drawn: rows = true class, columns = the final checkpoint's prediction.
    expected = np.zeros((2, 2), np.int64)
    np.add.at(expected, (arrays["labels"], arrays["confidence"][-1].argmax(axis=1)), 1)
    assert len(calls) == 1
    np.testing.assert_array_equal(calls[0][0][0], expected)


def test_unreadable_images_degrade_to_a_note(small_run: Path, tmp_path: Path) -> None:
    (tmp_path / "data-run.npz").unlink()
    html = report(small_run).read_text(encoding="utf-8")
    assert 'class="warn"' in html
    assert "training images are not shown" in html
    _decode_all_images(html)


def test_unreadable_finetune_is_a_note_not_an_error(small_run: Path) -> None:
    (small_run / "finetune" / "finetune.json").write_text("{not json")
    html = report(small_run).read_text(encoding="utf-8")
    assert "finetune.json could not be read" in html


# -- escaping -----------------------------------------------------------------------------


def test_class_names_from_data_are_escaped(tmp_path: Path) -> None:
    classes = [XSS, "$x^2$ \\frac", 'say "hi" & <b>bye</b>', "ok"]
    run = make_synthetic_run(tmp_path, classes=classes, finetune=True)
    page = report(run)
    html = page.read_text(encoding="utf-8")
    assert "<img src=x" not in html
    assert "<b>bye" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    # Only the page's own script: the CSP pins it by hash, and there is exactly one.
    assert html.count("<script") == 1
    _decode_all_images(html)  # "$x^2$" did not break matplotlib
    if CHROMIUM.exists():
        result = _browser_check(page, tmp_path)
        # An injected <img src=x> would count as a broken image.
        assert result["images_broken"] == 0, result
        assert XSS in result["text"]  # shown to the reader as text


# -- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "damage",
    [
        "no_analysis",
        "corrupt_json",
        "wrong_schema",
        "corrupt_npz",
        "missing_array",
        "bad_shape",
        "bad_proto_id",
        "k_not_a_number",
    ],
)
def test_missing_or_corrupt_analysis_is_one_line_error(run: Path, damage: str) -> None:
    analysis = run / "analysis"
    exp_path, npz_path = analysis / "explanation.json", analysis / "arrays.npz"
    if damage == "no_analysis":
        shutil.rmtree(analysis)
    elif damage == "corrupt_json":
        exp_path.write_text('{"schema": "whylook.explanation/1", ')
    elif damage == "wrong_schema":
        exp_path.write_text(json.dumps({"schema": "something/2"}))
    elif damage == "corrupt_npz":
        npz_path.write_bytes(b"PK\x03\x04 truncated")
    else:
        with np.load(npz_path) as npz:
            arrays = {k: npz[k] for k in npz.files}
        if damage == "missing_array":
            del arrays["saliency"]
        elif damage == "bad_shape":
            arrays["beta"] = arrays["beta"][:, :3]
        else:
            exp = json.loads(exp_path.read_text())
            if damage == "k_not_a_number":
                exp["k"] = "many"
            else:
                exp["uncertain_prototypes"][0]["id"] = "P-999"
            exp_path.write_text(json.dumps(exp))
        np.savez(npz_path, **arrays)
    with pytest.raises(WhylookError) as info:
        report(run)
    message = str(info.value)
    assert "\n" not in message
    assert f"run `whylook explain {run}` first" in message
    assert not (run / "report" / "index.html").exists()


def test_not_a_run_folder(tmp_path: Path) -> None:
    with pytest.raises(WhylookError, match="does not exist"):
        report(tmp_path / "nope")
    with pytest.raises(WhylookError, match=r"no run\.json\); create one with 'whylook train'"):
        report(tmp_path)
    # The same one-line messages, with what to do, as every other command's.
    (tmp_path / "run.json").write_text('{"schema": "whylook.run/1", "conf')
    with pytest.raises(WhylookError, match=r"is corrupt \(JSONDecodeError\); delete it and rerun"):
        report(tmp_path)
    (tmp_path / "run.json").write_text("[1, 2]")
    with pytest.raises(WhylookError, match="not written by whylook"):
        report(tmp_path)


def test_unwritable_out_is_a_one_line_error(small_run: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(WhylookError, match=r"cannot write the report to .*a-file/report "
                                           r"\(\w+Error: .*\); choose a folder"):
        report(small_run, out=blocker / "report")


def test_cli_report(
    small_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(small_run), "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.strip() == f"report: {tmp_path / 'out' / 'index.html'}"
    shutil.rmtree(small_run / "analysis")
    assert main(["report", str(small_run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert err.count("\n") == 1
    assert "whylook explain" in err
    assert main(["report"]) == 2
    assert capsys.readouterr().err == "error: name the run folder: whylook report RUN\n"


def _many_class_run(tmp_path: Path) -> Path:
    """40 classes (more than MAX_CLASS_SECTIONS), with uncertain entries on chosen pairs:
    c5 in three, c7, c9, c12 in one each (besides the run's own entry)."""
    run = make_synthetic_run(tmp_path, classes=[f"c{i}" for i in range(40)], k=6, n=120,
                             checkpoints=4)
    path = run / "analysis" / "explanation.json"
    exp = json.loads(path.read_text())
    template = exp["uncertain_prototypes"][0]
    for pair in (["c5", "c7"], ["c5", "c9"], ["c12", "c5"]):
        exp["uncertain_prototypes"].append({**template, "classes": pair})
    path.write_text(json.dumps(exp))
    return run


def _drawn(html: str) -> list[str]:
    return re.findall(r'<details id="class-(\d+)"', html)


def test_many_classes_draw_the_flagged_ones_and_list_the_rest(tmp_path: Path) -> None:
    from whylook.report import MAX_CLASS_SECTIONS

    run = _many_class_run(tmp_path)
    # The last ten classes wrong at the final checkpoint: among the many classes without an
    # uncertain entry, accuracy (not class order) decides which are drawn and listed.
    with np.load(run / "analysis" / "arrays.npz") as a:
        arrays = dict(a)
    final = arrays["confidence"][-1]
    late = arrays["labels"] >= 30
    final[late] = np.roll(np.eye(40, dtype=final.dtype)[arrays["labels"][late]], 1, axis=1)
    np.savez(run / "analysis" / "arrays.npz", **arrays)
    html = report(run).read_text()
    exp = json.loads((run / "analysis" / "explanation.json").read_text())
    with np.load(run / "analysis" / "arrays.npz") as a:
        labels, final = a["labels"], a["confidence"][-1].argmax(axis=1)
    # The rule, from the files: most uncertain entries first, then lowest accuracy.
    counts = {f"c{i}": 0 for i in range(40)}
    for u in exp["uncertain_prototypes"]:
        for c in u["classes"]:
            counts[c] += 1
    accuracy = {f"c{i}": float(np.mean(final[labels == i] == i)) if np.any(labels == i)
                else 2.0 for i in range(40)}
    ranked = sorted(range(40), key=lambda i: (-counts[f"c{i}"], accuracy[f"c{i}"], i))
    drawn = [int(i) for i in _drawn(html)]
    assert drawn == sorted(ranked[:MAX_CLASS_SECTIONS])
    assert {0, 1, 5, 7, 9, 12} <= set(drawn)
    assert set(range(30, 40)) <= set(drawn)
    # The printed summary lists the same classes (most of the 40 tie at no entry: the
    # accuracy decides which of them).
    summary = load_explanation(run).summary()
    block = summary.split("Shared prototypes per class (strongest first):\n")[1].split("\n\n")[0]
    listed = re.findall(r"^ +(c\d+): ", block, flags=re.MULTILINE)
    assert listed == [f"c{i}" for i in drawn]
    assert f"Drawn in full: {MAX_CLASS_SECTIONS} of 40 classes" in html
    assert len(list((run / "report").glob("class-*-beta.png"))) == MAX_CLASS_SECTIONS
    table = html.split('<details id="other-classes">')[1].split("</table>")[0]
    rows = re.findall(r"<tr><td>(c\d+)</td><td class=\"num\">(\d+)</td>"
                      r"<td class=\"num\">([^<]+)</td>", table)
    others = sorted(set(range(40)) - set(drawn))
    assert [r[0] for r in rows] == [f"c{i}" for i in others]
    for name, n, acc in rows:
        i = int(name[1:])
        assert int(n) == int(np.sum(labels == i))
        assert acc == ("—" if accuracy[name] > 1 else f"{100 * accuracy[name]:.1f}%")
    assert "The other 10 classes (table only)" in html


def test_report_classes_option_draws_those_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _many_class_run(tmp_path)
    out = tmp_path / "out"
    assert main(["report", str(run), "--out", str(out), "--classes", "c39", "c3"]) == 0
    html = (out / "index.html").read_text()
    assert _drawn(html) == ["3", "39"]
    assert "the 2 of 40 classes asked for" in html
    assert sorted(p.name for p in out.glob("class-*-beta.png")) == [
        "class-003-beta.png", "class-039-beta.png"]
    assert main(["report", str(run), "--out", str(out), "--classes", "all"]) == 0
    html = (out / "index.html").read_text()
    assert _drawn(html) == [str(i) for i in range(40)]
    assert "other-classes" not in html
    assert "Drawn in full" not in html
    assert len(list(out.glob("class-*-beta.png"))) == 40
    # Back to one class: the figures of the classes no longer drawn go.
    assert main(["report", str(run), "--out", str(out), "--classes", "c3"]) == 0
    assert sorted(p.name for p in out.glob("class-*.png")) == [
        "class-003-beta.png", "class-003-saliency.png"]
    capsys.readouterr()
    assert main(["report", str(run), "--out", str(out), "--classes", "c3", "cat"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "class 'cat' is not one of the run's 40 classes (c0, c1" in err
    assert "`all`" in err
    with pytest.raises(WhylookError, match="name at least one class"):
        report(run, out, classes=[])


def test_long_tables_are_cut_and_say_where_the_rest_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    report_module = importlib.import_module("whylook.report")
    run = _many_class_run(tmp_path)
    monkeypatch.setattr(report_module, "_MAX_TABLE_ROWS", 2)
    monkeypatch.setattr(report_module, "_MAX_UNCERTAIN_SHOWN", 1)
    html = report(run, classes=["c0"]).read_text()
    summary = ("The earliest 2 of 780 pairs (all of them are in explanation.json's "
               "learning_order)</summary>")
    assert html.count(summary) == 1
    assert html.split(summary)[1].split("</table>")[0].count("<tr><td>") == 2
    summary = ("3 more uncertain prototypes (table only: the first 2; all of them are in "
               "explanation.json's uncertain_prototypes)</summary>")
    assert html.count(summary) == 1
    assert html.split(summary)[1].split("</table>")[0].count("<tr><td>") == 2
    monkeypatch.setattr(report_module, "_MAX_TABLE_ROWS", 1000)
    html = report(run, classes=["c0"]).read_text()
    assert "All 780 pairs</summary>" in html
    assert "3 more uncertain prototypes (table only)</summary>" in html


# -- pieces -------------------------------------------------------------------------------


def test_grid_cells_map_to_pixel_ranges() -> None:
    # Cell (r, c) of an h×w map covers [r·H/h, (r+1)·H/h): 10 px over 3 cells -> 4, 3, 3.
    cells = np.zeros((3, 3), bool)
    cells[1, 2] = True
    mask = _pixel_mask(cells, 10, 10)
    ys, xs = np.nonzero(mask)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (4, 6, 7, 9)
    cells = np.zeros((7, 7), bool)
    cells[0, 6] = True
    ys, xs = np.nonzero(_pixel_mask(cells, 28, 28))
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (0, 3, 24, 27)


def test_thumbnail_outlines_the_patch_and_dims_the_rest() -> None:
    img = np.full((3, 32, 32), 200, np.uint8)
    cells = np.zeros((8, 8), bool)
    cells[2:4, 2:4] = True  # pixels 8..15 -> 16..31 at ×2
    th = thumbnail(img, cells)
    assert th.shape == (64, 64, 3)
    assert tuple(th[0, 0]) == (90, 90, 90)  # dimmed
    assert tuple(th[24, 24]) == (200, 200, 200)  # inside, untouched
    assert tuple(th[16, 20]) == (255, 208, 0)  # on the outline


def test_generic_tables() -> None:
    content = {
        "pair": ["2", "7"],
        "rows": [{"strategy": "a", "accuracy_mean": 0.9, "accuracy_std": 0.01, "extra": {"x": 1}}],
    }
    ts = tables(content, "ft")
    assert [t.title for t in ts] == ["ft", "ft: rows", "ft: rows [0]: extra"]
    assert ts[0].rows == [["pair", "2, 7"]]
    label, pairs = ts[1].mean_std_columns()
    assert label == "strategy"
    assert pairs == [("accuracy", "accuracy_mean", "accuracy_std")]


# -- size ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_page_stays_under_budget_for_k128_cifar(tmp_path: Path) -> None:
    run = make_synthetic_run(
        tmp_path,
        classes=list(CIFAR10_CLASSES),
        k=128,
        grid=(8, 8),
        channels=3,
        size=32,
        n_train=900,
        n=600,
        checkpoints=12,
    )
    page = report(run)
    size = page.stat().st_size
    assert size < PAGE_BUDGET_BYTES, f"{size / 2**20:.2f} MB"
    html = page.read_text(encoding="utf-8")
    assert html.count('class="card"') == 128
    # Collapsed by default, except the first block of the gallery and the first class.
    assert html.count("<details open>") + html.count('" open>') == 2


# -- a real browser -----------------------------------------------------------------------

_CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _chromium(args: list[str], tmp: Path) -> subprocess.CompletedProcess[str]:
    profile = tmp / "chromium-profile"
    profile.mkdir(exist_ok=True)
    return subprocess.run(
        [str(CHROMIUM), *_CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _browser_check(page: Path, tmp: Path) -> dict:
    """Load the page in headless Chromium; read what its check script wrote into <html>."""
    proc = _chromium(["--enable-logging=stderr", "--v=0", "--dump-dom", page.as_uri()], tmp)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # The page logs nothing itself: any console line is an error, a CSP violation included.
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    root = re.search(r"<html([^>]*)>", proc.stdout)
    assert root, proc.stdout[:500]
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', root.group(1)))
    text = re.sub(r"<[^>]+>", " ", proc.stdout)
    return {
        "console": console,
        "check": attrs.get("data-check"),
        "images_total": int(attrs.get("data-images-total", -1)),
        "images_broken": int(attrs.get("data-images-broken", -1)),
        "sections": attrs.get("data-sections", "").split(),
        "text": html_lib.unescape(text),
    }


def _assert_page_works(page: Path, tmp: Path, sections: list[str]) -> None:
    result = _browser_check(page, tmp)
    assert result["console"] == [], result["console"]
    assert result["check"] == "done", "the page's check script did not run"
    assert result["sections"] == sections
    assert result["images_total"] > 0, result
    assert result["images_broken"] == 0, result
    shot = tmp / "screenshot.png"
    proc = _chromium([f"--screenshot={shot}", "--window-size=1280,2000", page.as_uri()], tmp)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shot.is_file()
    with Image.open(shot) as img:
        assert img.size == (1280, 2000)
        # Not a blank page: the screenshot has real content (text, plots, patches).
        assert len(img.convert("L").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 50


@pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="headless Chromium (/usr/bin/chromium) is not installed; apt-get install chromium",
)
def test_page_loads_in_chromium(rendered: tuple[Path, Path], tmp_path: Path) -> None:
    _assert_page_works(rendered[1], tmp_path, [*CORE_SECTIONS, "finetune", "compare"])


_PIPELINE = ("whylook.train", "whylook.explain", "whylook.run", "whylook.models", "whylook.mapping")


@pytest.mark.slow
@pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in _PIPELINE),
    reason="the training/explain pipeline modules are not all present yet",
)
def test_report_of_a_real_small_run(tmp_path: Path) -> None:
    # Imported by name: these modules may not exist yet when this file is linted.
    explain = importlib.import_module("whylook.explain").explain
    train = importlib.import_module("whylook.train").train

    run = train("mnist5k", "smallcnn", epochs=1, checkpoints=4, device="cpu", out=tmp_path / "run")
    explain(run.path, k=8, analysis_size=200, device="cpu")
    page = report(run.path)
    html = page.read_text(encoding="utf-8")
    assert _sections(html) == CORE_SECTIONS
    assert html.count('class="card"') == 8
    assert "training images are not shown" not in html  # real MNIST patches
    _decode_all_images(html)
    if CHROMIUM.exists():
        _assert_page_works(page, tmp_path, CORE_SECTIONS)


# -- learning patterns (Steps 4-5 per transition) -----------------------------------------


def test_patterns_section_reads_each_group_from_the_arrays(small_run: Path) -> None:
    """Each group row: its size and make-up, the class whose confidence it gained most
    (recomputed here from the confidences) and the prototypes its own fit credits with
    that gain (z at least the threshold, β > 0, strongest first)."""
    from whylook.report import _Builder
    from whylook.report._inputs import load

    with np.load(small_run / "analysis" / "arrays.npz") as npz:
        a = {k: npz[k] for k in npz.files}
    section = _Builder(load(small_run)).patterns()
    assert section["note"] is None
    assert section["figure"] is not None
    groups, conf, labels = a["groups"], a["confidence"].astype(np.float64), a["labels"]
    expected = [(t, g) for t in range(groups.shape[0]) for g in np.unique(groups[t]) if g >= 0]
    assert [r["group"] for r in section["rows"]] == [g for _, g in expected]
    fits = {(int(t), int(g)): i for i, (t, g, _) in enumerate(a["beta_group_key"])}
    named = 0
    gained: dict[int, list[tuple[float, str]]] = {}
    for row, (t, g) in zip(section["rows"], expected, strict=True):
        rows = groups[t] == g
        assert row["size"] == rows.sum()
        most = int(np.argmax(np.bincount(labels[rows], minlength=2)))
        assert row["made_of"].startswith(f"{['a', 'b'][most]} (")
        mean = (conf[t + 1] - conf[t])[rows].mean(axis=0)
        gain = int(np.argmax(mean))
        if gain == most:  # a class's section names groups mostly of its own samples
            gained.setdefault(gain, []).append((-mean[gain], row["steps"]))
        assert row["gain"].startswith(f"{['a', 'b'][gain]} +")
        i = fits[(t, int(g))]
        z, beta = a["beta_group_z"][i][:, gain], a["beta_group"][i][:, gain]
        changed = (np.diff(a["intensity"], axis=0)[t][rows] != 0).sum(axis=0)
        want = [f"P-{k}" for k in np.argsort(-z, kind="stable")
                if z[k] >= 2 and beta[k] > 0 and changed[k] >= max(5, 0.1 * rows.sum())]
        assert [d["id"] for d in row["drivers"]] == want[:3]
        named += len(want[:3])
    assert named > 0, "the synthetic run must credit some prototype to check"
    # Each class's section names the groups mostly of its samples that gained most in it,
    # largest gain first.
    builder = _Builder(load(small_run))
    for ci, entry in enumerate(builder.classes()["drawn"]):
        assert [r["steps"] for r in entry["patterns"]] == [
            steps for _, steps in sorted(gained.get(ci, []))[:3]]
    assert any(entry["patterns"] for entry in builder.classes()["drawn"]), "nothing to check"


def test_patterns_section_without_group_fits_or_groups(small_run: Path) -> None:
    """An analysis written before the group fits were stored still shows its groups and
    says how to get the rest; all-noise transitions say so; a bad key is one error."""
    from whylook.report import _Builder
    from whylook.report._inputs import load

    for name in ("beta_group_key", "beta_group", "beta_group_z", "beta_group_se",
                 "beta_group_lambda"):
        _drop_array(small_run, name)
    section = _Builder(load(small_run)).patterns()
    assert section["rows"]
    assert all(r["drivers"] is None for r in section["rows"])
    assert "rerun `whylook explain`" in section["note"]
    html = report(small_run).read_text(encoding="utf-8")
    assert "Learning patterns" in html

    path = small_run / "analysis" / "arrays.npz"
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["groups"][:] = -1
    np.savez(path, **arrays)
    section = _Builder(load(small_run)).patterns()
    assert section["rows"] == []
    assert "all noise" in section["note"]

    arrays["beta_group_key"] = np.array([[99, 0, 10]])
    arrays["beta_group"] = arrays["beta_group_z"] = np.zeros((1, 4, 2), np.float32)
    np.savez(path, **arrays)
    with pytest.raises(WhylookError, match="transition out of range") as info:
        report(small_run)
    assert "\n" not in str(info.value)


def test_patterns_section_reads_explanation_json_first(small_run: Path) -> None:
    """Where explanation.json describes the learning patterns (as explain writes it), the
    report shows that description; a malformed entry is one line that says what to do."""
    from whylook.report import _Builder
    from whylook.report._inputs import load

    path = small_run / "analysis" / "explanation.json"
    exp = json.loads(path.read_text())
    exp["learning_patterns"] = [{
        "transition": 1, "steps": [0, 0], "group": 7, "size": 12,
        "made_of": [{"class": "b", "share": 0.75}, {"class": "a", "share": 0.25}],
        "gained_most": {"class": "b", "change": 0.25},
        "lost_most": {"class": "a", "change": -0.25},
        "prototypes": [{"id": "P-3", "z": 9.5}],
    }, {  # steady: an older file without the flag, or one that says so
        "transition": 1, "steps": [0, 0], "group": 8, "size": 30,
        "made_of": [{"class": "b", "share": 1.0}],
        "gained_most": {"class": "b", "change": 0.004},
        "lost_most": {"class": "a", "change": -0.004},
        "prototypes": [],
    }]
    path.write_text(json.dumps(exp))
    builder = _Builder(load(small_run))
    row, still = builder.patterns()["rows"]
    assert still["steady"]
    assert not row["steady"]
    exp["learning_patterns"][1]["steady"] = True
    path.write_text(json.dumps(exp))
    builder = _Builder(load(small_run))
    row, still = builder.patterns()["rows"]
    assert still["steady"]
    assert not row["steady"]
    steps = load(small_run).steps
    assert row["steps"] == f"{steps[1]} → {steps[2]}"
    assert (row["group"], row["size"], row["gain"], row["loss"]) == (7, 12, "b +0.250", "a -0.250")
    assert row["made_of"] == "b (75.0%), a (25.0%)"
    assert row["drivers"] == [{"id": "P-3", "anchor": "proto-3", "z": 9.5}]
    assert [r["group"] for r in builder.classes()["drawn"][1]["patterns"]] == [7]  # not steady 8
    html = report(small_run).read_text(encoding="utf-8")
    assert "P-3</a> (9.5)" in html
    assert "steady: no class moved by 0.01" in html

    for bad in ({"transition": 1}, {**exp["learning_patterns"][0], "transition": 99},
                {**exp["learning_patterns"][0], "steady": "no"},
                {**exp["learning_patterns"][0], "prototypes": [{"id": "P-99", "z": 1.0}]}):
        exp["learning_patterns"] = [bad]
        path.write_text(json.dumps(exp))
        with pytest.raises(WhylookError, match="inconsistent") as info:
            report(small_run)
        assert "\n" not in str(info.value)


def test_report_names_a_file_an_incomplete_run_and_a_non_path_as_explain_does(tmp_path):
    from whylook.run import INCOMPLETE_MARKER

    afile = tmp_path / "afile.txt"
    afile.write_text("")
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / INCOMPLETE_MARKER).write_text("")
    for target, message in ((afile, "is a file, not a run folder"),
                            (killed, r"is incomplete \(its training or import stopped"),
                            (None, r"must be a path \(str or os.PathLike\), not None")):
        with pytest.raises(WhylookError, match=message) as info:
            report(target)
        assert "\n" not in str(info.value)


def test_results_of_an_earlier_explanation_are_marked_as_such(tmp_path):
    """finetune.json and compare/*.json record the explanation they came from; after
    explain ran again the report says so (and says nothing for a current one)."""
    from whylook._io import file_digest

    run = make_synthetic_run(tmp_path)
    current = file_digest(run / "analysis" / "explanation.json")
    (run / "finetune").mkdir()
    (run / "finetune" / "finetune.json").write_text(json.dumps(
        {"start": {"explanation_sha256": "0" * 64, "index": 2}, "strategies": []}))
    (run / "compare").mkdir()
    for name, digest in (("old.json", "1" * 64), ("now.json", current)):
        (run / "compare" / name).write_text(json.dumps(
            {"run_a": {"name": "a", "explanation_sha256": digest}, "run_b": {"name": name}}))
    html = report(run).read_text(encoding="utf-8")
    warning = "Computed from an earlier explanation of this run (explain ran again since)"
    assert html.count(warning) == 2
    assert warning in html.split('<section id="finetune">')[1].split("</section>")[0]
    parts = html.split('<section id="compare">')[1].split("</section>")[0].split("<h3>")
    by_name = {part.split("</code>")[0].removeprefix("<code>compare/"): part
               for part in parts[1:]}
    assert warning in by_name["old.json"]
    assert warning not in by_name["now.json"]


def test_sample_strips_show_samples_where_the_prototype_is_active(small_run):
    """A strip under "looked at in 2% of its samples" shows those samples, not samples the
    prototype merely covers (the analysis's `active` decides, not the ranking measure)."""
    from whylook.report import _Builder
    from whylook.report._inputs import load

    path = small_run / "analysis" / "arrays.npz"
    with np.load(path) as npz:
        arrays = {name: npz[name] for name in npz.files}
    active = arrays["active"].astype(bool)
    k = int(np.argmax(active.sum(axis=0)))
    on = np.flatnonzero(active[:, k])
    active[on[: on.size // 2], k] = False  # half of them no longer count as looked at
    arrays["active"] = active
    np.savez(path, **arrays)
    builder = _Builder(load(small_run))
    rows = builder._rank(k, np.arange(len(builder.labels)), len(builder.labels))
    assert sorted(rows) == sorted(int(r) for r in on[on.size // 2:])


def test_the_rules_of_the_structure_are_on_the_page(run):
    """A loosened rule (here --min-swings 1) must be visible where the entries it decides
    are read."""
    path = run / "analysis" / "explanation.json"
    exp = json.loads(path.read_text())
    exp["structure_settings"] = {**exp.get("structure_settings", {}), "min_swings": 1,
                                 "active_threshold": 0.3, "z_threshold": 2.0}
    path.write_text(json.dumps(exp))
    html = report(run).read_text(encoding="utf-8")
    block = html.split("rules of the structure (Step 6)")[1].split("</table>")[0]
    for field, value in (("min_swings", "1"), ("active_threshold", "0.3"), ("z_threshold", "2")):
        assert re.search(rf"<td>{field}</td>\s*<td>{re.escape(value)}</td>", block), field


def test_never_separated_pairs_are_drawn_where_the_correlation_ranks_them(run):
    """The title's n counts the never-separated pairs (ranked after every separated one):
    they are on the figure, in a strip of their own, and the caption says so."""
    path = run / "analysis" / "explanation.json"
    exp = json.loads(path.read_text())
    order = exp["learning_order"]

    def scatter_height(steps: list[int | None]) -> tuple[str, int]:
        for e, step in zip(order, steps, strict=True):
            e["separated_at_step"] = step
        path.write_text(json.dumps(exp))
        html = report(run).read_text(encoding="utf-8")
        uri = html.split('" alt="distinctness vs separation step"')[0].rsplit('src="', 1)[1]
        png = base64.b64decode(uri.split(",", 1)[1])
        return html, Image.open(io.BytesIO(png)).size[1]

    order[3]["distinctness"] = None
    html, strip = scatter_height([None, None, None, 10, 100, 1000])
    assert "3 pairs never separated: the top strip" in html
    assert "1 pair without a distinctness not plotted" in html
    order[3]["distinctness"] = 0.5
    html, plain = scatter_height([1, 10, 10, 10, 100, 1000])
    assert "never separated" not in html
    assert "not plotted" not in html
    assert plain < strip
