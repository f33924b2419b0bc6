"""Figures that MLOps engineers would rather look at than read; each returns a matplotlib Figure for
mlflow.log_figure. Agg backend: no display needed on workers."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def composition(manifest: dict, intents: list[str]):
    """Per-intent rows in each split, next to the intent's share of the window's traffic."""
    splits = list(manifest["splits"])
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    x = np.arange(len(intents))
    width = 0.8 / len(splits)
    for k, split in enumerate(splits):
        counts = [manifest["splits"][split]["per_intent"].get(i, 0) for i in intents]
        ax.bar(x + k * width - 0.4 + width / 2, counts, width, label=f"{split} ({sum(counts)})")
    ax.set_xticks(x, intents, rotation=40, ha="right")
    ax.set_ylabel("rows")
    ax.set_yscale("log")
    ax.set_title(f"calibration version {manifest['version']}")
    ax.legend()
    traffic = manifest["traffic_intents"]
    total = sum(traffic.values()) or 1
    ax2.barh(intents[::-1], [100 * traffic.get(i, 0) / total for i in intents[::-1]], color="grey")
    ax2.set_xlabel("% of window traffic")
    w = manifest["window"]
    ax2.set_title(f"traffic {w['start']} .. {w['end']} ({total:,} requests)")
    fig.tight_layout()
    return fig


def confusion_matrix(cm: np.ndarray, labels: list[str], title: str):
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for i in range(len(labels)):
        for j in range(len(labels)):
            if cm[i, j]:
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("reviewed label")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, label="row-normalised")
    fig.tight_layout()
    return fig


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int, title: str):
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(confidence, edges) - 1, 0, bins - 1)
    acc = np.array([correct[idx == b].mean() if (idx == b).any() else np.nan for b in range(bins)])
    count = np.bincount(idx, minlength=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(5.5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.bar(centers, np.nan_to_num(acc), width=1 / bins, edgecolor="black", alpha=0.7, label="accuracy")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper left")
    ax2.bar(centers, count, width=1 / bins, color="grey")
    ax2.set_xlabel("confidence")
    ax2.set_ylabel("rows")
    fig.tight_layout()
    return fig


def per_class_recall(recall: dict[str, float], rare: list[str], title: str):
    labels = list(recall)
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(labels, [recall[k] for k in labels], color=["tab:red" if k in rare else "tab:blue" for k in labels])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("recall")
    ax.set_title(title + " (rare intents in red)")
    ax.tick_params(axis="x", rotation=40)
    fig.tight_layout()
    return fig


def latency_distribution(samples_ms: dict[str, list[float]], title: str):
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, samples in samples_ms.items():
        p95 = float(np.percentile(samples, 95))
        ax.hist(samples, bins=40, alpha=0.6, label=f"{name} (P95 {p95:.1f} ms)")
        ax.axvline(p95, linestyle="--", linewidth=1)
    ax.set_xlabel("latency at batch 1 (ms)")
    ax.set_ylabel("requests")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def close(fig) -> None:
    plt.close(fig)


def accuracy_vs_latency(points: dict[str, tuple[float, float, float, bool | None]], title: str,
                        quality_label: str = "accuracy"):
    """Each candidate at (P95, quality: accuracy, or the role's headline metric), marker area by size on disk;
    green passed every gate, red did not, black is the champion."""
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for name, (p95, acc, size_mb, passed) in points.items():
        color = "black" if passed is None else ("tab:green" if passed else "tab:red")
        ax.scatter(p95, 100 * acc, s=20 + 4 * size_mb, color=color, alpha=0.7, edgecolors="black")
        ax.annotate(f"{name}\n{size_mb:.0f} MB", (p95, 100 * acc), textcoords="offset points", xytext=(6, 4), fontsize=7)
    ax.set_xlabel("P95 latency at batch 1 (ms)")
    ax.set_ylabel(f"{quality_label} (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def sensitivity(rows: list[dict], title: str):
    """Drop (percentage points) when only one unit is quantized; the tallest bars are kept in FP32 first."""
    units = [r["unit"] for r in rows]
    fig, ax = plt.subplots(figsize=(7.5, 4))
    x = np.arange(len(units))
    keys = [k.removesuffix("_drop_pts") for k in rows[0] if k.endswith("_drop_pts")] if rows else []
    width = 0.8 / max(1, len(keys))
    for i, key in enumerate(keys):
        ax.bar(x - 0.4 + width * (i + 0.5), [r[f"{key}_drop_pts"] for r in rows], width,
               label=f"{key.replace('_', ' ')} drop")
    ax.set_xticks(x, units, rotation=30, ha="right")
    ax.set_ylabel("points vs FP32")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    return fig


def drift_psi(psi: dict[str, float], threshold: float, title: str):
    """PSI of each monitored feature, largest on top; red bars reach the drift threshold (dashed)."""
    names = sorted(psi, key=psi.get)
    fig, ax = plt.subplots(figsize=(8, max(3.0, 0.24 * len(names) + 1.2)))
    ax.barh(names, [psi[n] for n in names], color=["tab:red" if psi[n] >= threshold else "tab:blue" for n in names])
    ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"drift threshold {threshold:g}")
    ax.set_xlabel("PSI against the calibration-time reference")
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def drift_histograms(features: dict[str, tuple[list, list]], title: str):
    """Reference against live, per feature: overlaid histograms (numbers) or side-by-side shares (categories)."""
    n = max(1, len(features))
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (name, (ref, live)) in zip(axes.flat, features.items(), strict=False):
        if ref and isinstance(ref[0], str):
            cats = sorted(set(ref) | set(live))
            x = np.arange(len(cats))
            for k, (label, vals) in enumerate((("reference", ref), ("live", live))):
                ax.bar(x + (k - 0.5) * 0.4, [vals.count(c) / max(1, len(vals)) for c in cats], 0.4, label=label)
            ax.set_xticks(x, cats, rotation=40, ha="right", fontsize=7)
            ax.set_ylabel("share")
        else:
            both = np.concatenate([np.asarray(ref, float), np.asarray(live, float)])
            bins = np.histogram_bin_edges(both, bins=30)
            ax.hist(ref, bins=bins, density=True, alpha=0.55, label="reference")
            ax.hist(live, bins=bins, density=True, alpha=0.55, label="live")
        ax.set_title(name, fontsize=8)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(features):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def perplexity_vs_size_chart(rows: list[dict], path=None, title: str = "LLM candidates: perplexity vs size on disk"):
    """One point per candidate at (size on disk, perplexity), labelled, for two series: generic held-out text
    and MangaAssist conversations. rows: {"name", "size_bytes" (or "size_mb"), "generic_ppl", "domain_ppl"};
    a missing or None perplexity leaves that point out. Log-scale y: the two series differ by a lot.
    Saved as PNG when `path` is given; returns the Figure (for mlflow.log_figure)."""
    from matplotlib.ticker import ScalarFormatter

    from qat_tasks.core.plots import plt  # pyplot on the Agg backend

    fig, ax = plt.subplots(figsize=(8, 5))
    for key, label, marker, color in (("generic_ppl", "generic text (held-out Wikipedia/news)", "o", "tab:blue"),
                                      ("domain_ppl", "MangaAssist conversations", "s", "tab:orange")):
        pts = [(r["size_bytes"] / 2**20 if "size_bytes" in r else r["size_mb"], r[key], r["name"])
               for r in rows if r.get(key) is not None]
        if not pts:
            continue
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, label=label,
                   edgecolors="black", zorder=3)
        for x, y, name in pts:
            ax.annotate(f"{name} ({y:.2f})", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.set_xlim(left=0)  # the size saving reads at a glance
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def gate_intervals(rows: list[dict], title: str):
    """Each gate's loss with its interval, as a share of the gate's tolerance (1 = the tolerance): a bar left of
    the line passes, right of it fails, across it is insufficient evidence. Rows: gates.table()."""
    colours = {"pass": "tab:green", "fail": "tab:red", "insufficient evidence": "tab:orange"}
    rows = [r for r in rows if r["verdict"] in colours and r["loss"] is not None]
    fig, ax = plt.subplots(figsize=(8, 0.6 * max(2, len(rows)) + 1.2))
    for i, r in enumerate(rows):
        scale = r["tolerance"] if r["gate"] == "p95_ratio" or abs(r["tolerance"]) > 1e-12 else 1.0
        lo, hi = (r["ci_low"], r["ci_high"]) if r["ci_low"] is not None else (r["loss"], r["loss"])
        ax.plot([lo / scale, hi / scale], [i, i], color=colours[r["verdict"]], linewidth=4, solid_capstyle="butt")
        ax.plot(r["loss"] / scale, i, "o", color="black")
    ax.axvline(1.0, color="grey", linestyle="--", label="tolerance")
    ax.axvline(0.0, color="lightgrey", linewidth=0.8)
    ax.set_yticks(range(len(rows)), [f"{r['gate']} ({r['units']} {r['unit']})" for r in rows])
    ax.set_xlabel("loss / tolerance (P95 ratio / its maximum)")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def task_times(rows: list[dict], title: str):
    """Wall minutes per task (bars, longest first) beside each task's peak resident memory (GB)."""
    ordered = sorted(rows, key=lambda r: r["wall_s"])
    names = [r["task"] for r in ordered]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 0.32 * max(4, len(names)) + 1.4), sharey=True,
                                  gridspec_kw={"width_ratios": [3, 2]})
    y = np.arange(len(names))
    ax.barh(y, [r["wall_s"] / 60 for r in ordered], color="#4c72b0")
    ax.set_yticks(y, names, fontsize=8)
    ax.set_xlabel("wall time (minutes)")
    ax2.barh(y, [(r.get("peak_rss_mb") or 0) / 1024 for r in ordered], color="#dd8452", label="its process")
    ax2.scatter([(r.get("tree_peak_rss_mb") or 0) / 1024 for r in ordered], y, color="black", s=12, zorder=3,
                label="with the worker")
    ax2.set_xlabel("peak resident memory (GB)")
    ax2.legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
