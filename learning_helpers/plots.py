"""PNG figures for --eval (matplotlib, headless): the accuracy / GFLOPs trade-off and confusion matrices."""
from pathlib import Path

import matplotlib

matplotlib.use('Agg')  # no display on servers and boards
import matplotlib.pyplot as plt  # noqa: E402


def _thresholds_by_point(sweep: list[dict]) -> dict:
    """{(GFLOPs, accuracy): [thresholds]}: thresholds that land on the same point share one label."""
    points = {}
    for point in sweep:
        points.setdefault((point['expected_gflops'], point['accuracy']), []).append(point['threshold'])
    return points


def plot_tradeoff(results: dict, path: str | Path) -> Path:
    """Accuracy vs expected GFLOPs per image: the threshold sweep, each exit alone, the chosen point."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    sweep = results['sweep']
    ax.plot([p['expected_gflops'] for p in sweep], [p['accuracy'] for p in sweep], 'o-', label='gated early exit')
    for (gflops, accuracy), thresholds in _thresholds_by_point(sweep).items():
        label = f'{thresholds[0]:g}' if len(thresholds) == 1 else f'{thresholds[0]:g}-{thresholds[-1]:g}'
        ax.annotate(label, (gflops, accuracy), textcoords='offset points', xytext=(4, -10), fontsize=7)
    ax.plot(results['gflops_per_exit'], results['per_exit_accuracy'], 's--', color='grey', label='single exit')
    chosen = results['chosen']
    ax.plot([chosen['expected_gflops']], [chosen['accuracy']], '*', markersize=14, color='tab:red',
            label=f"chosen (t={chosen['threshold']:.2f})")
    ax.set_xlabel('GFLOPs per image')
    ax.set_ylabel('validation accuracy (%)')
    ax.set_title(f"{results.get('dataset', '')} {results.get('arch', '')}: accuracy vs compute")
    ax.grid(alpha=0.3)
    ax.legend(loc='lower right')
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_confusion(results: dict, path: str | Path) -> Path:
    """Confusion matrices of the full network and of early exit at the chosen threshold."""
    names = results['class_names']
    fig, axes = plt.subplots(1, 2, figsize=(2 + 0.5 * len(names) * 2, 1.5 + 0.5 * len(names)))
    for ax, key, title in zip(axes, ('full_network', 'at_chosen_threshold'),
                              ('full network', f"early exit t={results['chosen']['threshold']:.2f}")):
        matrix = results[key]['confusion_matrix']
        ax.imshow(matrix, cmap='Blues')
        for i, row in enumerate(matrix):
            for j, count in enumerate(row):
                if count:
                    ax.text(j, i, str(count), ha='center', va='center', fontsize=7)
        ax.set_xticks(range(len(names)), names, rotation=60, ha='right', fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xlabel('predicted')
        ax.set_ylabel('true')
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
