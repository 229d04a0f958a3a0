"""The figures: RoPE angles (LongLLaDA Fig. 4) and scaling methods, perplexity curves (Fig. 1a), needle heatmaps
(Fig. 2, 3, 6), query/key t-SNE (Fig. 5), RULER's table (Table 2) and LongBench's (Table 1). matplotlib is imported
only when a figure is drawn, and draws to files only (no screen needed). Nothing here imports the project's other
files: the scripts compute, this file draws."""
import math

import torch


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def length_names(lengths):
    """Tick labels for token lengths: 16384 -> '16k', 20000 -> '20000'."""
    return [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths]


def save(fig, out):
    """Write the figure and free it: pyplot keeps every open figure alive until it is closed."""
    fig.savefig(out, dpi=120)
    pyplot().close(fig)


def rope_rotations(models, span, out):
    """Fig. 4: cos/sin of m * theta_j against relative position m for a high-, a mid- and a low-frequency
    dim. Bidirectional training covers [-(T-1), T-1]; causal training only [0, T-1]. models: (name, head_dim,
    base, train_len, bidirectional, critical dim)."""
    fig, axes = pyplot().subplots(len(models), 3, figsize=(15, 3.2 * len(models)), squeeze=False)
    m = torch.arange(-span, span + 1, dtype=torch.float64)
    for row, (name, d, base, train_len, bidir, d_extra) in zip(axes, models):
        lo, hi = (-(train_len - 1), train_len - 1) if bidir else (0, train_len - 1)
        dims = [("high", d_extra // 4), ("mid: first beyond d_extra", d_extra // 2), ("low", (d_extra + d) // 4)]
        for ax, (kind, j) in zip(row, dims):
            theta = base ** (-2 * j / d)
            ax.plot(m, torch.cos(m * theta), lw=0.6, label="cos")
            ax.plot(m, torch.sin(m * theta), lw=0.6, label="sin")
            for a, b in [(-span, lo), (hi, span)]:  # the relative positions training never showed
                ax.axvspan(a, b, color="0.85")
            ax.set_title(f"{name}, dim {2 * j} ({kind}), period {2 * math.pi / theta:,.0f}", fontsize=9)
            ax.set(xlim=(-span, span), ylim=(-1.15, 1.15), xlabel="relative position m - n")
        row[0].legend(loc="lower left", fontsize=8)
        row[0].set_ylabel(f"trained [{lo}, {hi}]")
    fig.suptitle("RoPE angles seen in training (white) and not (grey): bidirectional vs causal (LongLLaDA Fig. 4)")
    fig.tight_layout()
    save(fig, out)


def rope_stretch(name, targets, theta, d_extra, out):
    """Per target length, one panel: how many times each method stretches the wavelength 2 pi / theta_j of each
    dim pair (theta_j / theta'_j, log scale), with the critical dim marked: the dims right of it never made a full
    turn in training, and a method reaches the target when it stretches them enough. targets: (length,
    [(method, setting, theta'_j), ...])."""
    fig, axes = pyplot().subplots(1, len(targets), figsize=(4.2 * len(targets), 4), sharey=True, squeeze=False)
    dims = torch.arange(0, 2 * len(theta), 2)
    for ax, (length, methods) in zip(axes[0], targets):
        for method, setting, inv in methods:
            ax.plot(dims, theta / inv, label=f"{method}: {setting}", lw=1.5)
        ax.axvline(d_extra, color="0.4", ls="--", lw=1)
        ax.text(d_extra, 1.02, f" critical dim {d_extra}", fontsize=8, color="0.3", va="bottom")
        ax.set(yscale="log", xlabel="dimension 2j", title=f"target {length:,} tokens")
        ax.legend(fontsize=7, loc="upper left")
    axes[0][0].set_ylabel("wavelength stretch (theta_j / theta'_j)")
    fig.suptitle(f"{name}: how each RoPE scaling method stretches each dimension's wavelength")
    fig.tight_layout()
    save(fig, out)


def ppl_curves(curves, train_lens, out):
    """Fig. 1a: perplexity against context length, one line per (label, lengths, ppl, at), trained lengths dashed.
    A full run draws its cumulative curve; a run of chosen lengths (`at`, eval_ppl --at) each chunk's own value, as
    dots joined by a dotted line."""
    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    for label, lengths, ppl, at in curves:
        ax.plot(lengths, ppl, "o:" if at else "-", label=label + (" (the chunk at each length)" if at else ""))
    for train_len in set(train_lens):
        ax.axvline(train_len, color="0.5", ls="--", lw=1)
        ax.text(train_len, ax.get_ylim()[1], f" trained {train_len}", va="top", fontsize=8, color="0.4")
    cumulative = not any(at for *_, at in curves)
    ax.set(xlabel="context length (tokens)", ylabel="perplexity (cumulative)" if cumulative else "perplexity",
           title="Perplexity vs context length")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, out)


def niah_heatmap(grid, lengths, depths, title, out):
    """Fig. 2: scores (depths, lengths) with depth down and length across, colours 0 to 100; above it the
    mean over depths per length as a line."""
    fig, (top, ax) = pyplot().subplots(2, 1, sharex=True, height_ratios=[1, 3], figsize=(1.2 * len(lengths) + 3, 7))
    im = ax.imshow(grid.numpy(), cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    top.plot(range(len(lengths)), grid.nanmean(0).numpy(), "k.-")
    top.set(ylim=(-5, 105), ylabel="mean over depths")
    top.set_title(title, fontsize=9)
    ax.set(xticks=range(len(lengths)), xticklabels=length_names(lengths), yticks=range(len(depths)),
           yticklabels=[f"{d:g}%" for d in depths], xlabel="prompt length (tokens)", ylabel="needle depth")
    fig.colorbar(im, ax=[top, ax], label="score")
    save(fig, out)


def qk_scatter(runs, out):
    """Fig. 5: per run a column, queries above and keys below, each token a point placed by t-SNE and coloured by
    its position; the colour bar marks the trained length. runs: dicts of positions, queries, keys (2-D), title,
    train_len."""
    fig, axes = pyplot().subplots(2, len(runs), figsize=(5.5 * len(runs), 9), squeeze=False)
    for col, run in zip(axes.T, runs):
        for ax, kind in zip(col, ("queries", "keys")):
            dots = ax.scatter(*run[kind].T, c=run["positions"], cmap="viridis", s=4)
            ax.set(xticks=[], yticks=[], title=f"{run['title']}: {kind}" if kind == "queries" else kind)
        bar = fig.colorbar(dots, ax=list(col), label="position")
        if run["train_len"] < run["positions"].max():
            bar.ax.axhline(run["train_len"], color="red", lw=2)
            bar.ax.text(1.5, run["train_len"], " trained\n length", color="red", fontsize=8, va="center",
                        transform=bar.ax.get_yaxis_transform())
    fig.suptitle("Last-layer query / key states after RoPE, t-SNE (LongLLaDA Fig. 5)")
    save(fig, out)


def score_table(grid, rows, columns, n_tasks, title, out, xlabel="context length (tokens)"):
    """A table of scores as a picture (RULER's Table 2, LongBench's Table 1): grid (rows, columns), the tasks first,
    then the averaged rows below a line; colours 0 to 100, each cell written out (a dash where nothing ran)."""
    fig, ax = pyplot().subplots(figsize=(1.4 * len(columns) + 3.5, 0.38 * len(rows) + 1.6))
    ax.imshow(grid.numpy(), cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    for i in range(len(rows)):
        for j in range(len(columns)):
            value = grid[i, j].item()
            ax.text(j, i, "-" if math.isnan(value) else f"{value:.1f}", ha="center", va="center", fontsize=8,
                    fontweight="bold" if i >= n_tasks else None)
    ax.axhline(n_tasks - 0.5, color="black", lw=1.5)
    ax.set(xticks=range(len(columns)), xticklabels=columns, yticks=range(len(rows)), yticklabels=rows, xlabel=xlabel)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save(fig, out)
