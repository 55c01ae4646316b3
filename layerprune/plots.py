"""Pictures people would rather look at than read. Written as PNG files that DVC versions."""
import io

import matplotlib

matplotlib.use("Agg")  # no display on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from layerprune.strategies import layers_label, runs  # noqa: E402
from layerprune.files import atomic_write_bytes  # noqa: E402


def similarity_heatmap(scores: np.ndarray, dropped, metric: str, title: str, path) -> None:
    """x: first dropped layer, y: block size n, colour: distance. Each row's best start is dotted; the dropped
    layers are boxed: a block of n layers at (start, n), and each run of a non-contiguous set at its own cell."""
    num_layers = scores.shape[1]
    fig, ax = plt.subplots(figsize=(7, 5.5), dpi=110)
    image = ax.imshow(scores, origin="lower", aspect="auto", cmap="viridis",
                      extent=(-0.5, num_layers - 0.5, -0.5, scores.shape[0] - 0.5))
    fig.colorbar(image, ax=ax, label=f"{metric} (lower = block changes less)")
    for n in range(1, scores.shape[0]):
        if not np.isnan(scores[n]).all():
            ax.plot(np.nanargmin(scores[n]), n, "w.", markersize=4)
    dropped_runs = runs(dropped)
    for start, stop in dropped_runs:
        ax.add_patch(plt.Rectangle((start - 0.5, stop - start - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    start, stop = dropped_runs[0]
    ax.annotate(f"drop {layers_label(dropped)}", (start, stop - start), xytext=(6, 6),
                textcoords="offset points", color="white", fontsize=9, fontweight="bold",
                bbox=dict(facecolor="red", edgecolor="none", alpha=0.8, pad=2))
    ax.set(xlabel="first dropped layer (start)", ylabel="block size n (layers dropped)", title=title,
           ylim=(0.5, scores.shape[0] - 0.5))
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
