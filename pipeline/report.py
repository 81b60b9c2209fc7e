"""Evaluation reports: metrics, figures, and self-contained HTML / Markdown summaries.

Figures are rendered with matplotlib's Agg backend to PNG files under ``figures/`` and
embedded in ``report.html`` as base64 data URIs, so the page opens offline anywhere.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    log_loss,
    precision_recall_curve,
    precision_recall_fscore_support,
)

GALLERY_SIZE = 36
TOP_PAIRS = 10


def classification_metrics(
    y_true: np.ndarray, proba: np.ndarray, *, labels: Sequence[int], y_pred: np.ndarray
) -> dict[str, Any]:
    """Accuracy, per-class and averaged precision/recall/F1/support, log-loss, AP.

    Parameters
    ----------
    y_true, y_pred : ndarray, shape (n,)
        Class indices into ``labels`` order (0..n_classes-1).
    proba : ndarray, shape (n, n_classes)
    labels : sequence of int
        Display label of each class index.
    """
    idx = np.arange(len(labels))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=idx, zero_division=0)
    out: dict[str, Any] = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "error_rate": float(1 - accuracy_score(y_true, y_pred)),
        "log_loss": float(log_loss(y_true, np.clip(proba, 1e-15, 1), labels=idx)),
        "n": len(y_true),
        "per_class": {
            str(labels[int(i)]): {
                "precision": float(p[i]),
                "recall": float(r[i]),
                "f1": float(f[i]),
                "support": int(s[i]),
                "average_precision": float(
                    average_precision_score(y_true == i, proba[:, i]) if s[i] else 0.0
                ),
            }
            for i in idx
        },
    }
    for avg in ("macro", "weighted"):
        pa, ra, fa, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=idx, average=avg, zero_division=0
        )
        out[avg] = {"precision": float(pa), "recall": float(ra), "f1": float(fa)}
    cm = confusion_matrix(y_true, y_pred, labels=idx)
    out["confusion_matrix"] = cm.tolist()
    off = cm.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(off, axis=None)[::-1][:TOP_PAIRS]
    out["most_confused"] = [
        {"true": int(labels[t]), "predicted": int(labels[q]), "count": int(off[t, q])}
        for t, q in zip(*np.unravel_index(order, off.shape), strict=True)
        if off[t, q] > 0
    ]
    return out


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def confusion_figure(cm: np.ndarray, labels: Sequence[str]) -> bytes:
    """Confusion matrix heat map with counts, rows true, columns predicted."""
    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * len(labels), 0.8 + 0.5 * len(labels)))
    shown = np.log1p(cm)
    ax.imshow(shown, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(
            j,
            i,
            str(v),
            ha="center",
            va="center",
            fontsize=8,
            color="white" if shown[i, j] > shown.max() * 0.6 else "black",
        )
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (test)")
    return _png(fig)


def pr_figure(
    y_true: np.ndarray,
    proba: np.ndarray,
    labels: Sequence[str],
    *,
    mark: tuple[float, float] | None = None,
) -> bytes:
    """One-vs-rest precision-recall curves with average precision in the legend.

    ``mark`` (recall, precision) highlights an operating point (binary mode threshold).
    """
    fig, ax = plt.subplots(figsize=(6.5, 5))
    classes = range(proba.shape[1]) if len(labels) > 2 else [1]
    for i in classes:
        positive = y_true == i
        if not positive.any():
            continue
        prec, rec, _ = precision_recall_curve(positive, proba[:, i])
        ap = average_precision_score(positive, proba[:, i])
        ax.plot(rec, prec, lw=1.2, label=f"{labels[i]} (AP {ap:.4f})")
    if mark is not None:
        ax.plot([mark[0]], [mark[1]], "ko", label="chosen threshold")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.01)
    ax.set_ylim(0, 1.01)
    ax.set_title("Precision-recall, one vs rest (test)")
    ax.legend(fontsize=7, loc="lower left", ncol=2)
    ax.grid(alpha=0.3)
    return _png(fig)


def gallery_figure(
    images: np.ndarray,
    *,
    true: Sequence[str],
    predicted: Sequence[str],
    probability: Sequence[float],
    image_ids: Sequence[int],
) -> bytes:
    """Grid of misclassified images captioned with true / predicted label and probability."""
    n = len(images)
    cols = 9
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.25, rows * 1.5))
    for k, ax in enumerate(np.atleast_1d(axes).ravel()):
        ax.axis("off")
        if k < n:
            ax.imshow(images[k], cmap="gray_r", interpolation="nearest")
            ax.set_title(
                f"#{image_ids[k]}\ntrue {true[k]} → {predicted[k]}\np={probability[k]:.3f}",
                fontsize=7,
            )
    fig.suptitle("Most confident mistakes on the test set", fontsize=10)
    return _png(fig)


def grid_figure(grid: Sequence[Mapping[str, Any]], *, metric: str) -> bytes:
    """Validation score against C for each non-C parameter combination."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    series: dict[str, list[tuple[float, float, float]]] = {}
    for row in grid:
        key = ", ".join(f"{k}={v}" for k, v in row["params"].items() if k != "C") or "C path"
        std = float(row.get("score_std") or 0.0) if len(row.get("fold_scores") or []) > 1 else 0
        series.setdefault(key, []).append((row["params"]["C"], row["score"], std))
    for key, pts in series.items():
        pts.sort()
        xs, ys, es = ([p[i] for p in pts] for i in range(3))
        if any(es):  # cross-validation: +- one standard deviation over the folds
            ax.errorbar(xs, ys, yerr=es, fmt="o-", capsize=3, label=f"{key} (± std)")
        else:
            ax.plot(xs, ys, "o-", label=key)
    ax.set_xscale("log")
    cs = sorted({float(row["params"]["C"]) for row in grid})
    ax.set_xticks(cs, [f"{c:g}" for c in cs], rotation=45, fontsize=7)
    ax.minorticks_off()
    ax.set_xlabel("C (inverse regularization)")
    ax.set_ylabel(f"validation {metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Grid search")
    return _png(fig)


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def write_report(folder: Path, *, metrics: Mapping[str, Any], figures: Mapping[str, bytes]) -> None:
    """Write ``figures/<name>.png``, ``report.html`` (figures embedded) and ``report.md``."""
    folder = Path(folder)
    fig_dir = folder / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    for name, data in figures.items():
        (fig_dir / f"{name}.png").write_bytes(data)
    test = metrics["test"]
    summary = [
        ("test accuracy", f"{test['accuracy']:.4%}"),
        ("test error rate", f"{test['error_rate']:.4%}"),
        ("macro F1", f"{test['macro']['f1']:.4f}"),
        ("log-loss", f"{test['log_loss']:.4f}"),
        ("best parameters", metrics["best_params"]),
        ("selection", metrics["selection"]),
        ("features", f"{metrics['n_features']} (config {metrics['feature_config_hash'][:12]})"),
        ("train / test images", f"{metrics['n_train']} / {test['n']}"),
    ]
    if metrics.get("mode") == "binary":
        summary.insert(
            1,
            (
                "positive class / threshold",
                f"{metrics['positive_class']} / {metrics['threshold']:.4f}",
            ),
        )
    per_class = [
        (c, *(_fmt(v[k]) for k in ("precision", "recall", "f1", "average_precision")), v["support"])
        for c, v in test["per_class"].items()
    ]
    grid_rows = [
        (
            ", ".join(f"{k}={v}" for k, v in g["params"].items()),
            f"{g['score']:.4f}",
            f"{g['score_std']:.4f}" if len(g.get("fold_scores") or []) > 1 else "-",
            f"{g['fit_seconds']:.2f}",
            g["n_iter"],
            "yes" if g.get("converged", True) else "no (max_iter)",
        )
        for g in metrics["grid"]
    ]
    if metrics.get("selection_rule"):
        summary.append(("selection rule", metrics["selection_rule"]))
    if metrics.get("grid_warning"):
        summary.append(("warning", metrics["grid_warning"]))
    pairs = [(p["true"], p["predicted"], p["count"]) for p in test["most_confused"]]
    timings = [(k, f"{v:.2f}") for k, v in metrics["timings"].items()]
    imgs = "".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,'
        f'{base64.b64encode(data).decode()}"><figcaption>{name}</figcaption></figure>'
        for name, data in figures.items()
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>MNIST logistic regression report</title>
<style>body{{font-family:system-ui,sans-serif;max-width:70rem;margin:2rem auto;padding:0 1rem}}
table{{border-collapse:collapse;margin:0.5rem 0 1.5rem}}td,th{{border:1px solid #ccc;
padding:0.2rem 0.6rem;text-align:right}}figure{{display:inline-block;margin:0.5rem}}
img{{max-width:100%}}</style></head><body>
<h1>MNIST logistic regression: evaluation report</h1>
{_table(summary, ("", "value"))}
<h2>Per class (test)</h2>
{_table(per_class, ("class", "precision", "recall", "F1", "AP", "support"))}
<h2>Most confused pairs (test)</h2>
{_table(pairs, ("true", "predicted", "count"))}
<h2>Grid search (validation)</h2>
{
        _table(
            grid_rows,
            (
                "parameters",
                metrics["selection_metric"],
                "± std",
                "fit s",
                "iterations",
                "converged",
            ),
        )
    }
<h2>Timings (s)</h2>
{_table(timings, ("stage", "seconds"))}
<h2>Figures</h2>
{imgs}
</body></html>
"""
    (folder / "report.html").write_text(page)
    md = ["# MNIST logistic regression: evaluation report", ""]
    md += [f"- **{k}**: {v}" for k, v in summary]
    md += ["", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    md += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[5]} |" for r in per_class]
    md += [
        "",
        "Most confused (true → predicted): " + ", ".join(f"{t}→{p} ({c})" for t, p, c in pairs[:5]),
        "",
    ]
    md += [f"![{name}](figures/{name}.png)" for name in figures]
    (folder / "report.md").write_text("\n".join(md) + "\n")
