"""PNG figures for --eval (matplotlib, headless): the accuracy / GFLOPs fronts and confusion matrices."""
from pathlib import Path

import matplotlib

matplotlib.use('Agg')  # no display on servers and boards
import matplotlib.pyplot as plt  # noqa: E402

from models.gates import GATES  # noqa: E402


BASELINE_STYLES = {'max_prob': ('max softmax probability', 'tab:orange'), 'entropy': ('entropy', 'tab:green')}


def _partial(results: dict) -> str:
    """A title's mark of an evaluation of only some validation images (--barely_train)."""
    return (f"\n(PARTIAL: {results['num_val']} of {results['num_val_total']} validation images)"
            if results.get('partial') else '')


def plot_tradeoff(results: dict, path: str | Path) -> Path:
    """Accuracy vs expected GFLOPs per image: the checkpoint's gates' front, the confidence baselines' fronts, each
    exit alone, and the chosen point."""
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    front = results['front']
    ax.step([p['expected_gflops'] for p in front], [p['accuracy'] for p in front], 'o-', where='post',
            markersize=3, label=f"{GATES[results['gate']].rule} (front)", color='tab:blue')
    for rule, baseline in results.get('baselines', {}).items():
        if rule in BASELINE_STYLES:
            label, colour = BASELINE_STYLES[rule]
            points = baseline['front']
            ax.step([p['expected_gflops'] for p in points], [p['accuracy'] for p in points], '.--', where='post',
                    markersize=3, color=colour, alpha=0.8, label=f'{label} threshold (front)')
    ax.plot(results['gflops_per_exit'], results['per_exit_accuracy'], 's:', color='grey', label='single exit')
    chosen = results['chosen']
    ax.plot([chosen['expected_gflops']], [chosen['accuracy']], '*', markersize=14, color='tab:red',
            label=f"chosen (t={chosen['threshold']:.3f}, {results.get('selection', {}).get('budget', '')})")
    ax.set_xlabel('expected GFLOPs per image')
    ax.set_ylabel('validation accuracy (%)')
    ax.set_title(f"{results.get('dataset', '')} {results.get('arch', '')}: accuracy vs compute{_partial(results)}")
    ax.grid(alpha=0.3)
    ax.legend(loc='lower right', fontsize=8)
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
        ax.set_title(title + _partial(results))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
