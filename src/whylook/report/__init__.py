"""``whylook report RUN``: one self-contained HTML page per run, plus the figures as PNG.

The page (``RUN/report/index.html`` by default) has inline CSS and images (base64 data
URIs), a Content-Security-Policy that allows no network access and only its own inline
script, and opens from disk. Beside it, every figure is saved as a PNG file for papers
and slides (``*.png`` for plots, ``patches/*.png`` for the image patches).

Sections: overview (data, model, layer, K, checkpoints, accuracy/loss, confusion matrix),
prototype gallery, per-class explanation (shared and specialized prototypes, β heatmap,
saliency across checkpoints), uncertain prototypes, learning order, and — when the run
folder has them — fine-tuning (``RUN/finetune/finetune.json``) and comparison
(``RUN/compare/*.json``) results.

Every string that comes from data or configuration is escaped by Jinja2's autoescape, so
a class named ``<img src=x onerror=alert(1)>`` shows as text; the CSP would block an
injected script even if escaping were bypassed.

Page size: the gallery shows each prototype's top samples as one strip of 64-px
thumbnails (PNG or JPEG, whichever is smaller) and the per-class figures are drawn at 80
dpi, so a 128-prototype, 10-class CIFAR run stays under :data:`PAGE_BUDGET_BYTES` (8 MB;
asserted by the tests). Measured: 3.5 MB for a synthetic K=128, 10-class 32×32 RGB run;
2.4 MB for ``whylook demo`` (MNIST, K=32). The page grows by roughly 100-200 KB per
class and 10-20 KB per prototype, so past :data:`MAX_CLASS_SECTIONS` classes only that
many are drawn in full (``classes=`` picks them) and the long tables (all class pairs,
uncertain entries) stop at 1000 rows, naming where the rest is: a 1000-class run's page
is 6.3 MB, written in about 20 s (191 MB and over 5 minutes when every class was drawn).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from whylook._checks import is_number
from whylook._io import file_digest, remove_temporaries, run_lock, write_bytes
from whylook._text import (
    floor_pct,
    near_chance_caution,
    pair_confusion_text,
    rank_classes,
    uncertain_entries_by_class,
    uncertain_null_lines,
)
from whylook.errors import WhylookError
from whylook.report import figures, patches
from whylook.report._inputs import Inputs, inconsistent, load
from whylook.report._tables import tables
from whylook.structure import (
    MIN_SEPARATED_PAIRS,
    UNSEEN_NOTE,
    accumulated_lead,
    blank_maps,
    blank_rates,
    class_accuracy,
    confusion_matrix,
    order_correlation_of,
    records_separation,
)

__all__ = ["MAX_CLASS_SECTIONS", "PAGE_BUDGET_BYTES", "report"]

#: Size limit of ``index.html`` for a K=128, 10-class CIFAR-10 run (asserted in tests).
PAGE_BUDGET_BYTES = 8 * 1024 * 1024

#: Classes drawn in full by default. A class section is 100-200 KB of figures and patches
#: and two figures to draw, so a 1000-class run drawn whole made a 190 MB page in over 5
#: minutes; past this many classes the report draws the ones the explanation flags most
#: and lists the rest in a table (``classes=`` / ``--classes`` picks others, or all).
MAX_CLASS_SECTIONS = 30

_TOP = 6  # thumbnails per prototype in the gallery and per uncertain prototype
_CLASS_TOP = 5  # thumbnails per shared prototype / specialized sub-group of a class
_MAX_SHARED_SHOWN = 8  # shared prototypes with patches per class (the rest are named)
_MAX_BETA_ROWS = 40  # prototypes in a class's β heatmap; all of them when K is this small
_MAX_UNCERTAIN_SHOWN = 24  # uncertain prototypes drawn in full (the rest in a table)
_UNCERTAIN_OPEN = 6  # of those, shown expanded (the others in one collapsed block)
_MAX_TIMELINE = 60  # class pairs drawn in the learning-order timeline
_CLASS_PATTERNS = 3  # learning-pattern groups named in a class's section
_GALLERY_PAGE = 16  # prototypes per collapsible block of the gallery
_SALIENCY_PANELS = 6  # checkpoints in a class's saliency strip
# Rows of the page's long tables (all class pairs, uncertain entries past those drawn):
# the rest stay in explanation.json, which the table's summary names.
_MAX_TABLE_ROWS = 1000

# The page's only script: it checks that every image decoded and records what it found
# on <html> (data-check, data-images-*, data-sections) for a headless browser to read.
# It reads nothing outside the page and sends nothing anywhere; the CSP allows it by hash.
_CHECK_SCRIPT = (
    "window.addEventListener('load',function(){"
    "var imgs=Array.prototype.slice.call(document.images);"
    "var bad=imgs.filter(function(i){return !(i.complete&&i.naturalWidth>0);});"
    "var ids=Array.prototype.map.call(document.querySelectorAll('section[id]'),"
    "function(s){return s.id;});"
    "var r=document.documentElement;"
    "r.setAttribute('data-images-total',String(imgs.length));"
    "r.setAttribute('data-images-broken',String(bad.length));"
    "r.setAttribute('data-sections',ids.join(' '));"
    "r.setAttribute('data-check','done');});"
)
_OWN_FILES = re.compile(
    r"^(overview|prototypes|class|uncertain|learning|finetune|compare)-[\w.-]*\.png$"
)


@dataclass
class _Files:
    """Figures gathered while building the page, written together at the end."""

    files: dict[str, bytes] = field(default_factory=dict)

    def figure(self, name: str, png: bytes, photo: bool = False) -> str:
        self.files[name] = png
        if photo:
            # Image-like figures (saliency over photos) are several times smaller as JPEG;
            # the PNG file on disk stays lossless.
            return _uri(*patches.smaller_inline(png))
        return _uri(png, "image/png")

    def patch(self, name: str, rgb: np.ndarray) -> str:
        png, inline, mime = patches.encode(rgb)
        self.files[f"patches/{name}"] = png
        return _uri(inline, mime)


def _uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


class _Builder:
    """Turns checked :class:`Inputs` into the template's context (and the figures)."""

    def __init__(self, inp: Inputs, classes: Sequence[str] | None = None) -> None:
        self.inp = inp
        self.a = inp.arrays
        self.exp = inp.explanation
        self.out = _Files()
        self.labels = self.a["labels"].astype(np.int64)
        self.assign = self.a["assignments"]
        self.k = inp.k
        self.m = len(inp.classes)
        self.end_steps = inp.steps[1:]  # transition t ends at checkpoint t+1
        self.blank = self._blank()
        # (T, K): spread of each prototype's intensity change over the analysis set at each
        # transition, to show β per typical change of attention (figures.beta_heatmap).
        self.dp_sd = (np.diff(self.a["intensity"].astype(np.float64), axis=0).std(axis=1)
                      if "intensity" in self.a else None)
        settings = self.exp.get("structure_settings")
        threshold = settings.get("z_threshold") if isinstance(settings, dict) else None
        self.z_threshold = float(threshold) if isinstance(threshold, int | float) else 2.0
        self.share = self._activity()
        self.images = inp.images if inp.images is not None else self._stand_in_images()
        self.drawn, self.drawn_note = self._pick_classes(classes)

    # -- shared helpers ------------------------------------------------------------------

    def _blank(self) -> np.ndarray:
        """(T, M): per transition, the fraction of each class's samples whose Grad-CAM map
        is all zero at both of its checkpoints (invisible to β there)."""
        return blank_rates(blank_maps(self.a["saliency"]), self.labels, self.m)[1]

    def _activity(self) -> np.ndarray:
        """(n, K): how strongly each prototype is looked at in each sample, for ranking.

        The analysis's own measure when stored (``activity``: the rule that decides
        "active"), else the share of final saliency mass (``mass_share``, the method's
        reading), else that share computed from the final saliency and assignments.
        """
        for name in ("activity", "mass_share"):
            if name in self.a:
                return np.asarray(self.a[name], dtype=np.float64)
        sal = self.a["saliency"][-1].astype(np.float64).reshape(len(self.labels), -1)
        flat = self.assign.reshape(len(self.labels), -1).astype(np.int64)
        share = np.zeros((len(self.labels), self.k))
        rows = np.repeat(np.arange(len(self.labels)), flat.shape[1])
        np.add.at(share, (rows, flat.ravel()), sal.ravel())
        total = share.sum(axis=1, keepdims=True)
        return np.divide(share, total, out=np.zeros_like(share), where=total > 0)

    @functools.cached_property
    def _final_accuracy(self) -> list[float | None]:
        """Per class: final analysis-set accuracy (None for a class with no samples)."""
        return class_accuracy(self.a["confidence"][-1], self.labels, self.m)

    @functools.cached_property
    def _uncertain_by_class(self) -> dict[int, list[str]]:
        """Class -> the uncertain-prototype entries it takes part in, as "P-k (a ↔ b)"."""
        # One prototype can swing in several pairs: name the pair, not just the id.
        return {
            self.inp.class_index(name): [
                f"{u.get('id')} ({' ↔ '.join(str(c) for c in u['classes'][:2])})"
                for u in entries]
            for name, entries in uncertain_entries_by_class(
                self.exp.get("uncertain_prototypes") or []).items()
        }

    def _pick_classes(self, asked: Sequence[str] | None) -> tuple[set[int], str | None]:
        """The classes drawn in full, and the page's sentence on the choice (None: all).

        ``asked`` names classes as the run does, or ``["all"]``; without it every class
        is drawn up to :data:`MAX_CLASS_SECTIONS`, and past that the ones in the most
        uncertain-prototype entries, then those the final model gets wrong most often:
        where a reader looks first, since those are what fine-tuning works on."""
        everything = set(range(self.m))
        if asked is not None:
            # One string names one class (or `all`), not one class per character.
            names = [asked] if isinstance(asked, str) else [str(a) for a in asked]
            if names == ["all"] and "all" not in self.inp.classes:
                return everything, None
            if not names:
                raise WhylookError("no class to draw was named; name at least one class, "
                                   "or `all`")
            unknown = [a for a in names if a not in self.inp.class_indices]
            if unknown:
                shown = ", ".join(self.inp.classes[:10]) + (" …" if self.m > 10 else "")
                raise WhylookError(
                    f"class {unknown[0][:40]!r} is not one of the run's {self.m} classes "
                    f"({shown}); name classes as explanation.json does, or `all`")
            chosen = {self.inp.class_index(a) for a in names}
            if len(chosen) == self.m:
                return chosen, None
            return chosen, (f"Drawn in full: the {len(chosen)} of {self.m} classes asked "
                            "for; the others are in the table below.")
        if self.m <= MAX_CLASS_SECTIONS:
            return everything, None
        entries = self._uncertain_by_class
        order = rank_classes([len(entries.get(c, [])) for c in range(self.m)],
                             self._final_accuracy)
        return set(order[:MAX_CLASS_SECTIONS]), (
            f"Drawn in full: {MAX_CLASS_SECTIONS} of {self.m} classes, those in the most "
            "uncertain-prototype entries, then those the final model gets wrong most often "
            "on the analysis set; the others are in the table below.")

    def _stand_in_images(self) -> np.ndarray:
        """Final saliency as grey images, so patches still show where, if not what."""
        sal = self.a["saliency"][-1].astype(np.float64)
        peak = sal.reshape(len(sal), -1).max(axis=1)[:, None, None]
        img = np.divide(sal, peak, out=np.zeros_like(sal), where=peak > 0)
        img = np.repeat(np.repeat(img, 8, axis=1), 8, axis=2)
        return (img * 255).astype(np.uint8)[:, None]

    def _rank(self, k: int, rows: np.ndarray, top: int) -> list[int]:
        """Rows where prototype k is most active, among those where the analysis counts it
        as active (where that is stored), else where it is looked at at all: a strip under
        "looked at in 2% of its samples" shows those samples, not ones it merely covers."""
        rows = np.asarray(rows, dtype=np.int64)
        present = (self.assign[rows] == k).any(axis=(1, 2))  # also fine for no rows
        looked_at = (np.asarray(self.a["active"])[rows, k].astype(bool) if "active" in self.a
                     else self.share[rows, k] > 0)
        rows = rows[present & looked_at]
        order = np.lexsort((rows, -self.share[rows, k]))  # stable tie-break on row
        return [int(r) for r in rows[order][:top]]

    def _strip(self, name: str, rows: Sequence[int], protos: Sequence[int]) -> str | None:
        if not rows:
            return None
        thumbs = [
            patches.thumbnail(self.images[r], np.isin(self.assign[r], list(protos)))
            for r in rows
        ]
        return self.out.patch(name, patches.strip(thumbs))

    def _valid_rows(self, rows: Any) -> list[int]:
        n = len(self.labels)
        if not isinstance(rows, list):
            return []
        return [int(r) for r in rows if isinstance(r, int) and 0 <= r < n]

    def _analysis_accuracy(self) -> list[float]:
        pred = self.a["confidence"].argmax(axis=2)
        return [float(np.mean(p == self.labels)) for p in pred]

    # -- sections ------------------------------------------------------------------------

    def overview(self) -> dict[str, Any]:
        inp, exp = self.inp, self.exp
        run_info = exp.get("run") or {}
        raw_config = inp.run.get("config")
        config: dict[str, Any] = raw_config if isinstance(raw_config, dict) else {}
        h, w = inp.grid
        facts = [
            ("data", run_info.get("data") or config.get("data") or inp.run.get("data")),
            ("model", run_info.get("model") or config.get("model")),
            ("prototype layer", exp.get("layer") or run_info.get("layer")),
            ("feature grid (h×w)", f"{h}×{w}"),
            ("prototypes K", f"{self.k}" + (f" ({exp['k_choice']})" if exp.get("k_choice")
                                           else "")),
            ("classes", f"{self.m}: " + ", ".join(inp.classes[:20])
             + (" …" if self.m > 20 else "")),
            ("checkpoints", f"{len(inp.steps)} (steps {inp.steps[0]} … {inp.steps[-1]})"),
            ("analysis set", f"{len(self.labels)} training samples"),
            ("final test accuracy", _pct(inp.test_accuracy[-1])),
        ]
        ckpt_rows = []
        epochs = [c.get("epoch") for c in exp["checkpoints"]]
        acc_an = self._analysis_accuracy()
        for i, step in enumerate(inp.steps):
            loss = inp.test_loss[i]
            epoch = epochs[i]
            ckpt_rows.append([str(i), str(step),
                              f"{epoch:.3g}" if isinstance(epoch, int | float) else "—",
                              _pct(inp.test_accuracy[i]), "—" if loss is None else f"{loss:.4f}",
                              _pct(acc_an[i])])
        acc_uri = self.out.figure("overview-accuracy.png", figures.accuracy_loss(
            inp.steps, inp.test_accuracy, inp.test_loss, acc_an))
        if "confusion" in self.a:
            matrix = np.asarray(self.a["confusion"][-1])
            source = (f"analysis set (n={len(self.labels)}), final checkpoint, from "
                      "arrays.npz confusion[-1]")
        else:
            matrix = confusion_matrix(self.labels, self.a["confidence"][-1].argmax(axis=1),
                                      self.m)
            source = (f"analysis set (n={len(self.labels)}), final checkpoint, recomputed "
                      "from the stored confidences")
        conf_uri = self.out.figure("overview-confusion.png", figures.confusion(
            matrix, inp.classes, "confusion matrix of the final model"))
        settings = exp.get("settings") if isinstance(exp.get("settings"), dict) else {}
        rules = (exp.get("structure_settings")
                 if isinstance(exp.get("structure_settings"), dict) else {})
        # run.json's "train" or "import": only imported checkpoints may expect other inputs.
        origin = inp.run.get("source") if isinstance(inp.run.get("source"), str) else None
        return {
            "facts": [(k, "—" if v is None else str(v)) for k, v in facts],
            "caution": near_chance_caution(acc_an[-1], self.m, source=origin),
            "checkpoints": ckpt_rows,
            "accuracy": acc_uri,
            "confusion": conf_uri,
            "confusion_source": source,
            # The rules behind "active", "shared", "specialized" and "uncertain" (Step 6),
            # e.g. a loosened --min-swings, beside the analysis's own settings.
            "settings": ((tables(settings, "analysis settings") if settings else [])
                         + (tables(rules, "rules of the structure (Step 6)") if rules else [])),
            "config": tables(config, "run configuration") if config else [],
            "versions": tables(inp.run["versions"], "package versions")
            if isinstance(inp.run.get("versions"), dict) else [],
        }

    def _roles(self) -> dict[int, list[str]]:
        """Prototype -> short notes of where the explanation names it."""
        roles: dict[int, list[str]] = {}
        for entry in self.exp["classes_explained"]:
            c = str(entry.get("class"))
            for pid in entry.get("shared") or []:
                roles.setdefault(self.inp.proto_index(pid), []).append(f"shared in {c}")
            for g in entry.get("specialized") or []:
                for pid in g.get("prototypes") or []:
                    roles.setdefault(self.inp.proto_index(pid), []).append(
                        f"specialized in {c} (group {g.get('group')})")
        for u in self.exp.get("uncertain_prototypes") or []:
            a, b = [*(u.get("classes") or []), "?", "?"][:2]
            roles.setdefault(self.inp.proto_index(u.get("id")), []).append(
                f"uncertain {a} ↔ {b}")
        return roles

    def gallery(self) -> dict[str, Any]:
        inp = self.inp
        rates = np.zeros((self.k, self.m))
        protos: dict[int, dict[str, Any]] = {}
        for p in self.exp["prototypes"]:
            k = inp.proto_index(p.get("id"))
            protos[k] = p
            by_class = p.get("active_rate_by_class") or {}
            for c, v in by_class.items():
                if str(c) in inp.classes and isinstance(v, int | float):
                    rates[k, inp.classes.index(str(c))] = float(v)
        if not protos and "active" in self.a:
            # No per-prototype entries: fall back to the stored active mask.
            for ci in range(self.m):
                rows = self.labels == ci
                if rows.any():
                    rates[:, ci] = self.a["active"][rows].mean(axis=0)
        roles = self._roles()
        cards = []
        all_rows = np.arange(len(self.labels))
        for k in range(self.k):
            p = protos.get(k, {})
            rows = self._valid_rows(p.get("top_samples"))[:_TOP] or self._rank(k, all_rows, _TOP)
            order = np.argsort(-rates[k], kind="stable")[: min(3, self.m)]
            cards.append({
                "id": f"P-{k}",
                "anchor": f"proto-{k}",
                "strip": self._strip(f"prototype-P-{k}.png", rows, [k]),
                "captions": [inp.classes[self.labels[r]] for r in rows],
                "active_rate": p.get("active_rate"),
                "presence_rate": p.get("presence_rate"),
                "top_classes": [(inp.classes[c], float(rates[k, c])) for c in order
                                if rates[k, c] > 0],
                "roles": roles.get(k, []),
            })
        pages = [
            {"label": f"P-{i} … P-{min(i + _GALLERY_PAGE, self.k) - 1}",
             "cards": cards[i : i + _GALLERY_PAGE]}
            for i in range(0, self.k, _GALLERY_PAGE)
        ]
        heat = self.out.figure("prototypes-active-rate.png",
                               figures.active_rates(rates, inp.classes))
        return {"pages": pages, "heatmap": heat, "k": self.k}

    def _shown_beta(self, ci: int) -> np.ndarray:
        """(T, K): β for class ``ci`` as the heatmap shows it (per s.d. of ΔP when known)."""
        beta = self.a["beta"][:, :, ci].astype(np.float64)
        return beta if self.dp_sd is None else beta * self.dp_sd

    def _beta_rows(self, ci: int, named: list[int]) -> list[int]:
        if self.k <= _MAX_BETA_ROWS:
            return list(range(self.k))
        strength = np.abs(self._shown_beta(ci)).sum(axis=0)
        chosen = list(dict.fromkeys(named))[:_MAX_BETA_ROWS]
        for k in np.argsort(-strength, kind="stable"):
            if len(chosen) >= _MAX_BETA_ROWS:
                break
            if int(k) not in chosen:
                chosen.append(int(k))
        return sorted(chosen)

    def classes(self) -> dict[str, Any]:
        """The classes drawn in full (``drawn``) and a table row for each of the others."""
        inp = self.inp
        conf = self.a["confidence"]
        t1 = conf.shape[0]
        panels = sorted({round(x) for x in np.linspace(0, t1 - 1, min(_SALIENCY_PANELS, t1))})
        uncertain_by_class = self._uncertain_by_class
        out, others = [], []
        accuracy = self._final_accuracy
        for entry in self.exp["classes_explained"]:
            ci = inp.class_index(entry.get("class"))
            name = inp.classes[ci]
            shared_ids = [inp.proto_index(p) for p in entry.get("shared") or []]
            if ci not in self.drawn:
                others.append({
                    "name": name, "n": entry.get("n", int(np.sum(self.labels == ci))),
                    "accuracy": _pct(accuracy[ci]),
                    "shared": [{"id": f"P-{k}", "anchor": f"proto-{k}"} for k in shared_ids],
                    "specialized": len(entry.get("specialized") or []),
                    "uncertain": len(uncertain_by_class.get(ci, [])),
                })
                continue
            rows = np.nonzero(self.labels == ci)[0]
            strengths = list(entry.get("shared_strength") or [])
            shared = []
            for j, k in enumerate(shared_ids[:_MAX_SHARED_SHOWN]):
                top = self._rank(k, rows, _CLASS_TOP)
                shared.append({
                    "id": f"P-{k}", "anchor": f"proto-{k}",
                    "strength": strengths[j] if j < len(strengths) else None,
                    "strip": self._strip(f"class-{ci:03d}-shared-P-{k}.png", top, [k]),
                })
            more_shared = [f"P-{k}" for k in shared_ids[_MAX_SHARED_SHOWN:]]
            candidates = self._no_shared_candidates(entry.get("why_no_shared"), ci, rows)
            specialized = []
            named = list(shared_ids) + [c["index"] for c in candidates]
            for j, g in enumerate(entry.get("specialized") or []):
                ks = [inp.proto_index(p) for p in g.get("prototypes") or []]
                named += ks
                samples = self._valid_rows(g.get("samples"))
                if not samples and "class_groups" in self.a:
                    samples = [int(r) for r in rows if self.a["class_groups"][r] == g.get("group")]
                samples = samples[:_CLASS_TOP]
                specialized.append({
                    "group": g.get("group"), "size": g.get("size"),
                    "prototypes": [{"id": f"P-{k}", "anchor": f"proto-{k}"} for k in ks],
                    "strip": self._strip(f"class-{ci:03d}-group-{j}.png",
                                         samples, ks),
                })
            beta_rows = self._beta_rows(ci, named)
            z = self.a["beta_z"][:, beta_rows, ci].T if "beta_z" in self.a else None
            role = dict.fromkeys(shared_ids, " (shared)")
            beta_uri = self.out.figure(
                f"class-{ci:03d}-beta.png",
                figures.beta_heatmap(self._shown_beta(ci)[:, beta_rows].T,
                                     [f"P-{k}{role.get(k, '')}" for k in beta_rows],
                                     self.end_steps, name, z, self.blank[:, ci],
                                     per_sd=self.dp_sd is not None))
            saliency = None
            if len(rows):
                # The sample the final model is surest about: its attention has settled,
                # so the strip shows where it moved from.
                r = int(rows[np.argmax(conf[-1, rows, ci])])
                saliency = {
                    "uri": self.out.figure(
                        f"class-{ci:03d}-saliency.png",
                        figures.saliency_strip(
                            self.images[r], self.a["saliency"][panels, r],
                            [inp.steps[i] for i in panels],
                            [float(conf[i, r, ci]) for i in panels], name), photo=True),
                    "row": r,
                    "sample": int(self.a["sample_index"][r]),
                }
            out.append({
                "index": ci,
                "name": name,
                "n": entry.get("n", len(rows)),
                "accuracy": _pct(accuracy[ci]),
                "shared": shared,
                "more_shared": more_shared,
                "candidates": candidates,
                # False only where the diagnosis says no prototype reaches the activity bar.
                "activity_met": not (isinstance(entry.get("why_no_shared"), dict)
                                     and entry["why_no_shared"].get("activity_met") is False),
                "specialized": specialized,
                "beta": beta_uri,
                "beta_per_sd": self.dp_sd is not None,
                "beta_note": "" if len(beta_rows) == self.k else
                f"{len(beta_rows)} of {self.k} prototypes: those this class's explanation "
                "names and those with the largest |β| (as shown) for it",
                "saliency": saliency,
                "unseen": self._unseen(entry.get("learning_unseen")),
                "uncertain": uncertain_by_class.get(ci, []),
                "patterns": self._patterns_of(ci),
            })
        return {"drawn": out, "others": others, "note": self.drawn_note}

    def _unseen(self, value: Any) -> str | None:
        """The class's learning unseen as a percentage, when high enough to mention."""
        if value is None:  # written before the field existed
            return None
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
            raise inconsistent(self.inp.run_path, "bad learning_unseen entry")
        return floor_pct(value) if value >= UNSEEN_NOTE else None

    def _no_shared_candidates(self, why: Any, ci: int, rows: np.ndarray) -> list[dict[str, Any]]:
        """Patches of the prototypes each half of the "shared" rule admits, for a class
        that has none (``why_no_shared`` in explanation.json)."""
        if not isinstance(why, dict):
            return []
        threshold = self.exp.get("settings", {}).get("support_threshold")
        known = isinstance(threshold, (int, float))

        def numbers(c: Any) -> tuple[float, float]:
            values: list[Any] = [c.get(key) if isinstance(c, dict) else None
                      for key in ("active_rate", "support_z")]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise inconsistent(self.inp.run_path, "bad why_no_shared entry")
            return float(values[0]), float(values[1])

        picks = []
        for c in why.get("most_active") or []:
            rate, z = numbers(c)
            bar = f" (below {threshold:.2f})" if known and z < threshold else ""
            also = c.get("also_active_in") or []
            if not isinstance(also, list):
                raise inconsistent(self.inp.run_path, "bad why_no_shared entry")
            shared_with = (f"; also looked at in most samples of {', '.join(map(str, also))}"
                           if also else "")
            picks.append((c, f"looked at in {floor_pct(rate)} of its samples; support z "
                             f"{z:+.1f}{bar}{shared_with}"))
        best = why.get("best_supported")
        if best is not None:
            rate, z = numbers(best)  # checked even when it is already shown above
            if best.get("id") not in [c.get("id") for c, _ in picks]:
                picks.append((best, f"support z {z:+.1f}, but looked at in only "
                                    f"{floor_pct(rate)} of its samples"))
        out = []
        for c, note in picks:
            k = self.inp.proto_index(c.get("id"))
            out.append({"id": f"P-{k}", "anchor": f"proto-{k}", "index": k, "note": note,
                        "strip": self._strip(f"class-{ci:03d}-candidate-P-{k}.png",
                                             self._rank(k, rows, _CLASS_TOP), [k])})
        return out

    def uncertain(self) -> dict[str, Any]:
        inp = self.inp
        null, drift = self._uncertain_null()
        items, rest = [], []
        for i, u in enumerate(self.exp.get("uncertain_prototypes") or []):
            k = inp.proto_index(u.get("id"))
            pair = list(u.get("classes") or [])
            if len(pair) != 2:
                continue
            a, b = inp.class_index(pair[0]), inp.class_index(pair[1])
            steps = [int(s) for s in u.get("steps") or [] if isinstance(s, int | float)]
            row = {"id": f"P-{k}", "anchor": f"proto-{k}", "a": inp.classes[a],
                   "b": inp.classes[b], "swings": u.get("swings"),
                   "swing_word": "swing" if u.get("swings") == 1 else "swings",
                   "step_word": "step" if len(steps) == 1 else "steps",
                   "steps": ", ".join(str(s) for s in steps) or "—",
                   "drift": drift.get((f"P-{k}", *pair))}
            if i >= _MAX_UNCERTAIN_SHOWN:
                rest.append(row)
                continue
            # Half the patches from each class of the pair: the point is that the same
            # prototype shows up in both (a prototype strongest in one class would
            # otherwise fill the strip with that class alone).
            top_a = self._rank(k, np.nonzero(self.labels == a)[0], _TOP)
            top_b = self._rank(k, np.nonzero(self.labels == b)[0], _TOP)
            half = max(_TOP // 2, _TOP - len(top_b))
            top = top_a[:half] + top_b[: _TOP - min(half, len(top_a))]
            row["strip"] = self._strip(f"uncertain-P-{k}-{a}-{b}.png", top, [k])
            row["captions"] = [inp.classes[self.labels[r]] for r in top]
            # The accumulated lead in standard errors, as Step 6 read it (files written
            # before 2026-12-05 lack lead_z: it is recomputed as it was read then). Without
            # standard errors (arrays not written by whylook) the entry has no plot rather
            # than a misleading one.
            lead_z = self._lead_z(u, k, a, b)
            row["plot"] = None if lead_z is None else self.out.figure(
                f"uncertain-P-{k}-{a}-{b}.png",
                figures.uncertain_support(
                    self.end_steps, lead_z, self.z_threshold,
                    (inp.classes[a], inp.classes[b]), steps, f"P-{k}"))
            items.append(row)
        return {"entries": items[:_UNCERTAIN_OPEN], "folded": items[_UNCERTAIN_OPEN:],
                "rest": rest[:_MAX_TABLE_ROWS], "rest_total": len(rest),
                "check": self._pair_confusion(), "null": null}

    def _uncertain_null(self) -> tuple[str | None, dict[tuple[str, ...], str]]:
        """The sentence on ``whylook explain --uncertain-null`` (None when not measured)
        and, per entry the shuffles flagged too, in how many of them ("3/20")."""
        null = self.exp.get("uncertain_by_chance")
        if null is None:
            return None, {}

        def count(v: object) -> bool:
            return is_number(v) and v >= 0

        ok = isinstance(null, dict)
        if ok:
            entries = null.get("entries_in_shuffles", [])
            # Files from the first version of the check hold the shuffles alone.
            keys = (("draws", "sign_flipped_mean", "shuffled_mean") if "draws" in null
                    else ("shuffles", "mean"))
            ok = isinstance(entries, list) and all(count(null.get(key)) for key in keys)
            ok = ok and all(isinstance(e, dict) and isinstance(e.get("id"), str)
                            and count(e.get("shuffles")) and isinstance(e.get("classes"), list)
                            and len(e["classes"]) == 2 for e in entries)
        if not ok:
            raise inconsistent(self.inp.run_path, "bad uncertain_by_chance entry")
        lines = uncertain_null_lines(null)
        text = (f"Measured with --uncertain-null: {lines[0]}. The first is what "
                "the rule flags with every true coefficient zero; the second keeps each "
                "class's and prototype's average change per transition, which the ridge "
                "credits (it has no intercept). Entries marked \"drift\" come up under "
                "the shuffles too: their swings go with two classes trading confidence on "
                "average, and on the runs measured so far those were the pairs the model "
                "confused most (docs/METHOD-NOTES.md, Step 6).") if "draws" in null else (
                f"Measured with --uncertain-null: {lines[0]}.")
        draws = null.get("draws")
        drift = {(e["id"], *map(str, e["classes"])): f"{e['shuffles']}/{draws}"
                 for e in entries}
        return text, drift

    def _pair_confusion(self) -> str | None:
        """The sentence on how much the flagged pairs were confused (older files: none)."""
        check = self.exp.get("uncertain_pairs_confusion")
        if check is None:
            return None
        lift = check.get("lift") if isinstance(check, dict) else "missing"
        if lift is None:
            return None
        if not is_number(lift) or not lift >= 0:
            raise inconsistent(self.inp.run_path, "bad uncertain_pairs_confusion entry")
        text = pair_confusion_text(float(lift))
        return text[0].upper() + text[1:] + "."

    def _lead_z(self, entry: dict[str, Any], k: int, a: int, b: int) -> np.ndarray | None:
        """The entry's accumulated lead per transition, in standard errors."""
        stored = entry.get("lead_z")
        if isinstance(stored, list) and len(stored) == len(self.end_steps) and all(
            is_number(v) for v in stored
        ):
            return np.asarray(stored, dtype=np.float64)
        if "beta_se" not in self.a:
            return None
        return accumulated_lead(self.a["beta"], self.a["beta_se"], k, a, b)

    def learning(self) -> dict[str, Any]:
        order: list[dict[str, Any]] = []
        for e in self.exp.get("learning_order") or []:
            pair = [str(x) for x in (e.get("pair") or [])]
            if len(pair) != 2:
                continue
            d = e.get("distinctness")
            order.append({"pair": f"{pair[0]} – {pair[1]}",
                          "step": int(e["separated_at_step"]) if records_separation(e) else None,
                          "distinctness": float(d) if isinstance(d, int | float) else None})
        # Earliest first, never-separated last; stable, so ties keep the explanation's order.
        order.sort(key=lambda e: (e["step"] is None, e["step"] or 0))
        separated, rho, p = order_correlation_of(self.exp)
        n_pairs = (self.exp.get("learning_order_correlation") or {}).get("n_pairs", len(order))
        if separated < MIN_SEPARATED_PAIRS:
            title = (f"Spearman ρ undefined (too few separated pairs: {separated}, at least "
                     f"{MIN_SEPARATED_PAIRS} needed)")
        elif rho is not None:
            title = f"Spearman ρ = {rho:.2f}" + (
                f" (p = {p:.2g}, n = {n_pairs})" if p is not None else "")
        else:
            title = "Spearman ρ undefined (no variation)"
        result: dict[str, Any] = {"rows": order[:_MAX_TABLE_ROWS], "total": len(order),
                                  "title": title, "timeline": None, "scatter": None,
                                  "note": ""}
        if not order:
            return result
        shown = order[:_MAX_TIMELINE]
        note = f"earliest {len(shown)} of {len(order)} pairs" if len(order) > len(shown) else ""
        result["note"] = note
        result["timeline"] = self.out.figure("learning-order-timeline.png",
                                             figures.learning_timeline(
                                                 [e["pair"] for e in shown],
                                                 [e["step"] for e in shown],
                                                 self.inp.steps, note))
        pts = [e for e in order if e["step"] is not None and e["distinctness"] is not None]
        never = [e["distinctness"] for e in order
                 if e["step"] is None and e["distinctness"] is not None]
        if pts:
            result["scatter"] = self.out.figure(
                "learning-order-scatter.png",
                figures.distinctness_scatter([e["distinctness"] for e in pts],
                                             [e["step"] for e in pts],
                                             [e["pair"] for e in pts], title, never))
        result["never"] = len(never)
        result["unplotted"] = len(order) - len(pts) - len(never)
        return result

    @functools.cached_property
    def _pattern_rows(self) -> tuple[list[dict[str, Any]], list[list[tuple[int, int | None]]]]:
        """Every learning-pattern group as a table row, and per transition the groups'
        ``(size, class gained most or None when steady)`` for the figure (both empty
        without ``groups``).

        From ``explanation.json``'s ``learning_patterns``; an analysis written before that
        field gets the same description from its arrays (without drivers if it lacks the
        group fits)."""
        from whylook.patterns import describe_groups, is_steady

        inp = self.inp
        entries = self.exp.get("learning_patterns")
        if not isinstance(entries, list):
            if "groups" not in self.a:  # its shape, when present, was checked on loading
                return [], []
            entries = [g.to_json(inp.classes, inp.steps) for g in describe_groups(
                self.a["groups"], self.labels, self.a["confidence"], fits=self._group_fits(),
                intensity=self.a.get("intensity"), z_threshold=self.z_threshold)]
        rows: list[dict[str, Any]] = []
        sizes: list[list[tuple[int, int | None]]] = [[] for _ in self.end_steps]
        for e in entries:
            t, size = int(e["transition"]), int(e["size"])
            gain, loss = e["gained_most"], e["lost_most"]
            gain_class = inp.class_index(gain["class"])
            made_of = [(c["class"], c["share"]) for c in e["made_of"]]
            protos = e.get("prototypes")
            steady = bool(e.get("steady", is_steady(gain["change"], loss["change"])))
            rows.append({
                "steps": f"{inp.steps[t]} → {inp.steps[t + 1]}", "group": int(e["group"]),
                "size": size, "share": _pct(size / len(self.labels)),
                "made_of": ", ".join(f"{c} ({_pct(share)})" for c, share in made_of),
                "most_of": inp.class_index(made_of[0][0]) if made_of else None,
                "gain_class": gain_class, "gain_value": float(gain["change"]),
                "steady": steady,
                "gain": f"{gain['class']} {gain['change']:+.3f}",
                "loss": f"{loss['class']} {loss['change']:+.3f}",
                "drivers": None if protos is None else [
                    {"id": d["id"], "anchor": f"proto-{inp.proto_index(d['id'])}",
                     "z": float(d["z"])} for d in protos],
            })
            sizes[t].append((size, None if steady else gain_class))
        return rows, sizes

    def _patterns_of(self, ci: int) -> list[dict[str, Any]]:
        """The groups mostly of class ``ci`` that gained most in it, largest gain first (a
        few). Mixed groups whose largest gain is a class's are left out, and steady ones:
        a group where nothing much moved (late in training) still has a largest gain, of
        +0.001."""
        rows = [r for r in self._pattern_rows[0]
                if r["gain_class"] == ci and r["most_of"] == ci and not r["steady"]]
        return sorted(rows, key=lambda r: -r["gain_value"])[:_CLASS_PATTERNS]

    def patterns(self) -> dict[str, Any]:
        """Steps 4-5 per transition: each HDBSCAN group, what its confidences did, and the
        prototypes its own ridge fit credits with the confidence it gained most."""
        from whylook.patterns import STEADY_CHANGE

        rows, sizes = self._pattern_rows
        result: dict[str, Any] = {"rows": rows, "figure": None, "note": None,
                                  "z": self.z_threshold,
                                  "steady_min": f"{STEADY_CHANGE:g}"}
        described = "learning_patterns" in self.exp
        if not rows:
            result["note"] = (
                "Every transition came out all noise: no group of samples changed its "
                "confidences alike (patterns.all_noise_transitions)."
                if described or "groups" in self.a else
                "This analysis has no learning-pattern groups (arrays.npz groups).")
            return result
        if not described and self._group_fits() is None:
            result["note"] = ("This analysis predates the stored group fits: rerun `whylook "
                              "explain` to see which prototypes drove each group.")
        result["figure"] = self.out.figure(
            "patterns.png", figures.pattern_groups(self.end_steps, sizes, len(self.labels),
                                                   self.inp.classes))
        return result

    def _group_fits(self) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] | None:
        """``{(t, group): (beta (K, M), z (K, M))}`` from arrays.npz, None if not stored."""
        key, beta, z = (self.a.get(name) for name in
                        ("beta_group_key", "beta_group", "beta_group_z"))
        if key is None or beta is None or z is None:
            return None
        return {(int(t), int(g)): (beta[i], z[i]) for i, (t, g, _) in enumerate(key)}

    def _result_block(self, prefix: str, content: Any, title: str) -> list[dict[str, Any]]:
        blocks = []
        for i, table in enumerate(tables(content, title)):
            plots = []
            label, pairs = table.mean_std_columns()
            if label is not None:
                for what, mean, std in pairs[:4]:
                    plots.append(self.out.figure(
                        f"{prefix}-{i}-{re.sub(r'[^A-Za-z0-9_]', '_', what)[:40]}.png",
                        figures.bars_mean_std(
                            [str(r.get(label)) for r in table.records],
                            [float(r[mean]) for r in table.records],
                            [float(r[std]) if std and isinstance(r.get(std), int | float)
                             else None for r in table.records],
                            what)))
            blocks.append({"table": table, "plots": plots})
        return blocks

    @functools.cached_property
    def _explanation_digest(self) -> str:
        # Once for the page: a thousand-class explanation.json is some 80 MB to hash.
        return file_digest(self.inp.run_path / "analysis" / "explanation.json")

    def _stale(self, content: Any, part: str, command: str) -> str | None:
        """A warning when a result records another explanation of this run than its current
        one (explain ran again since); results written before the record say nothing."""
        stored = content.get(part, {}).get("explanation_sha256") if isinstance(
            content, dict) and isinstance(content.get(part), dict) else None
        if not isinstance(stored, str) or stored == self._explanation_digest:
            return None
        return (f"Computed from an earlier explanation of this run (explain ran again since); "
                f"rerun `{command}` to bring it up to date.")

    def finetune(self) -> dict[str, Any] | None:
        if self.inp.finetune is None:
            return None
        content, err = self.inp.finetune
        if err:
            return {"error": err, "stale": None, "blocks": []}
        return {"error": None,
                "stale": self._stale(content, "start", f"whylook finetune {self.inp.run_path}"),
                "blocks": self._result_block("finetune", content, "fine-tuning")}

    def compare(self) -> list[dict[str, Any]]:
        out = []
        for i, (name, content, err) in enumerate(self.inp.compare):
            blocks = [] if err else self._result_block(f"compare-{i}", content, name)
            stale = None if err else self._stale(
                content, "run_a", f"whylook compare {self.inp.run_path} RUN_B")
            out.append({"name": name, "error": err, "stale": stale, "blocks": blocks})
        return out

    def build(self) -> dict[str, Any]:
        from whylook import __version__

        ctx: dict[str, Any] = {
            "title": self.inp.run_path.resolve().name,
            # Caption cells under a strip line up with its thumbnails (plus the gap).
            "cap_w": patches.thumbnail(self.images[0]).shape[1] + patches.GAP,
            "version": __version__,
            "image_note": self.inp.image_note,
            "overview": self.overview(),
            "gallery": self.gallery(),
            "classes": self.classes(),
            "uncertain": self.uncertain(),
            "patterns": self.patterns(),
            "learning": self.learning(),
            "finetune": self.finetune(),
            "compare": self.compare(),
        }
        sections = [("overview", "Overview"), ("prototypes", "Prototypes"),
                    ("classes", "Classes"), ("uncertain", "Uncertain prototypes"),
                    ("patterns", "Learning patterns"), ("learning-order", "Learning order")]
        if ctx["finetune"] is not None:
            sections.append(("finetune", "Fine-tuning"))
        if ctx["compare"]:
            sections.append(("compare", "Comparison"))
        ctx["sections"] = sections
        return ctx


def _render(context: dict[str, Any]) -> str:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("whylook.report", "templates"),
        # Every string from data or config is escaped, whatever the template's extension.
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    # Rates rounded down, as in the summary and the class sections: 49.7% never reads 50%.
    env.filters["pct"] = floor_pct
    digest = base64.b64encode(hashlib.sha256(_CHECK_SCRIPT.encode()).digest()).decode()
    return env.get_template("report.html").render(
        **context, check_script=_CHECK_SCRIPT, script_hash=f"sha256-{digest}"
    )


def _is_within(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def _write(out: Path, files: dict[str, bytes], html: str, *, locked: bool) -> Path:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WhylookError(
            f"cannot write the report to {out} ({exc.__class__.__name__}: {exc.strerror}); "
            "choose a folder you can write with --out"
        ) from None
    # index.html marks a complete report: the old one goes before its figures are replaced,
    # so a kill in between leaves no page that shows another report's figures.
    (out / "index.html").unlink(missing_ok=True)
    if locked:
        # A killed report's temporary files, of its own names only: --out may hold others.
        remove_temporaries(out, "*.png")
        remove_temporaries(out, "index.html")
        remove_temporaries(out / "patches", "*.png")
    for name, data in sorted(files.items()):
        write_bytes(out / name, data)
    # Remove figures an earlier report wrote that this one did not (fewer classes, K, ...):
    # only names this module produces, so a user's own files in --out are never touched.
    for path in sorted(out.glob("*.png")):
        if _OWN_FILES.match(path.name) and path.name not in files:
            path.unlink()
    if (out / "patches").is_dir():
        for path in sorted((out / "patches").glob("*.png")):
            if f"patches/{path.name}" not in files:
                path.unlink()
    return write_bytes(out / "index.html", html.encode("utf-8"))


def report(
    run: str | Path | Any,
    out: str | Path | None = None,
    *,
    classes: Sequence[str] | str | None = None,
) -> Path:
    """Write the HTML report of a run folder and return the path of ``index.html``.

    Args:
        run: a run folder with ``run.json`` and ``analysis/`` (``whylook explain RUN``):
            its path, or the :class:`~whylook.run.RunFolder` or
            :class:`~whylook.explain.Explanation` a previous call returned.
        out: output folder; default ``RUN/report``. It receives ``index.html``, the plots
            as ``*.png`` and the image patches as ``patches/*.png``.
        classes: the classes whose sections are drawn in full (names as in
            ``explanation.json``, or ``"all"``; one string names one class); the others
            get a row in a table.
            Default: every class up to :data:`MAX_CLASS_SECTIONS`; past that, the
            classes in the most uncertain-prototype entries, then the least accurate.

    Raises:
        WhylookError: the folder is not a run, or its analysis is missing, corrupt or
            inconsistent ("run `whylook explain RUN` first"); a class in ``classes`` is
            not the run's; or another whylook command holds the run folder (when ``out``
            is inside it).

    When ``out`` lies inside the run folder the report holds the folder's ``run_lock``
    (not re-entrant: callers that already hold it must write the report outside of it).

    Example:
        >>> from whylook.report import report
        >>> path = report("runs/a")  # doctest: +SKIP
        >>> path.name  # doctest: +SKIP
        'index.html'
    """
    from whylook._io import require_run_folder

    run = require_run_folder(run)
    out_dir = Path(out) if out is not None else run / "report"
    if _is_within(out_dir, run):
        with run_lock(run):
            return _report(run, out_dir, classes, locked=True)
    return _report(run, out_dir, classes, locked=False)


def _report(run: Path, out: Path, classes: Sequence[str] | None, *, locked: bool) -> Path:
    inputs = load(run)
    builder = _Builder(inputs, classes)
    with figures.reusing():  # one β heatmap and saliency figure for all classes
        context = builder.build()
    html = _render(context)
    return _write(out, builder.out.files, html, locked=locked)
