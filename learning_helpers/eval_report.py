"""--eval: the early-exit report. One cached pass gives per-exit accuracy and the whole threshold sweep;
real early exit then runs once at the chosen threshold and must agree with the cache."""
import time

import torch

from errors import GFNetDynnError
from learning_helpers.distributed import synchronize
from learning_helpers.conformal import prediction_set_stats
from learning_helpers.exit_cache import (ExitCache, cheapest_within, collect_exit_outputs, conditional_exit_choice,
                                         exit_point, gated_predictions, per_exit_accuracy, threshold_sweep)
from models.early_exit import EarlyExitEngine
from models.gfnet_dynn import GFNetDynn

KEEP_INPUTS_BYTES = 2 * 1024**3  # keep decoded validation batches up to this size for the real-exit pass


def run_real_early_exit(model: GFNetDynn, batches, device: torch.device, threshold: float) -> dict:
    """Real early exit over `batches`: predictions, exit indices and the seconds spent in the model."""
    engine = EarlyExitEngine(model, threshold)
    predictions, exits, seconds = [], [], 0.0
    for images, _ in batches:
        images = images.to(device, non_blocking=True)
        synchronize(device)
        started = time.perf_counter()
        result = engine(images)
        synchronize(device)
        seconds += time.perf_counter() - started
        predictions.append(result.predictions.cpu())
        exits.append(result.exit_index.cpu())
    return {'predictions': torch.cat(predictions), 'exit_index': torch.cat(exits), 'seconds': seconds}


def class_report(targets: torch.Tensor, predictions: torch.Tensor, class_names: list[str]) -> dict:
    """Per-class precision, recall, F1 (%) and the confusion matrix (rows: true class)."""
    # imported here: scikit-learn takes seconds to import, which every training process would pay
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
    labels = list(range(len(class_names)))
    precision, recall, f1, support = precision_recall_fscore_support(targets, predictions, labels=labels,
                                                                     zero_division=0)
    return {'per_class': [{'class': name, 'precision': 100 * float(p), 'recall': 100 * float(r),
                           'f1': 100 * float(f), 'support': int(s)}
                          for name, p, r, f, s in zip(class_names, precision, recall, f1, support)],
            'confusion_matrix': confusion_matrix(targets, predictions, labels=labels).tolist()}


def conformal_report(cache: ExitCache, thresholds: dict | None) -> dict | None:
    """Coverage and mean size of the conformal prediction sets, with the qhats the checkpoint stored (calibrated
    on the validation set when it was written) and the exit rule they were calibrated for; None without them."""
    if not isinstance(thresholds, dict) or 'alphas' not in thresholds:
        return None
    chosen = conditional_exit_choice(cache.gate_probs)
    return {'calibrated_on': 'the validation set, when the checkpoint was written',
            'exit_rule': 'training-time gating (a_k >= 0.5)', 'thresholds': thresholds,
            **prediction_set_stats(cache, chosen, thresholds)}


def evaluate_early_exit(model: GFNetDynn, val_loader, device: torch.device, *, thresholds: list[float],
                        exit_threshold: float | None, gflops_per_exit: list[float], class_names: list[str],
                        conformal: dict | None = None, max_batches: int | None = None,
                        amp: bool = False) -> tuple[dict, ExitCache]:
    """Everything --eval reports: the results dict documented in the README, plus extra keys."""
    started = time.perf_counter()
    cache, batches = collect_exit_outputs(model, val_loader, device, max_batches=max_batches, amp=amp,
                                          keep_inputs=KEEP_INPUTS_BYTES)
    cached_pass_seconds = time.perf_counter() - started
    if cache.targets.numel() == 0:
        raise GFNetDynnError('the validation set is empty; put images in the val folder')
    accuracies = per_exit_accuracy(cache)
    sweep = threshold_sweep(cache, thresholds, gflops_per_exit)
    chosen = cheapest_within(sweep, accuracies[-1]) if exit_threshold is None else \
        threshold_sweep(cache, [exit_threshold], gflops_per_exit)[0]
    if not batches:  # the validation set was too large to keep: read it again
        batches = [batch for step, batch in enumerate(val_loader) if max_batches is None or step < max_batches]
    real = run_real_early_exit(model, batches, device, chosen['threshold'])
    cached_predictions, cached_exits = gated_predictions(cache, chosen['threshold'])
    mismatches = int((real['predictions'] != cached_predictions).sum() + (real['exit_index'] != cached_exits).sum())
    results = {
        'num_classes': len(class_names), 'class_names': class_names, 'num_val': int(cache.targets.numel()),
        'exit_positions': list(model.exit_positions), 'gflops_per_exit': gflops_per_exit,
        'full_gflops': gflops_per_exit[-1], 'per_exit_accuracy': accuracies, 'full_accuracy': accuracies[-1],
        'sweep': sweep,
        'chosen': {**chosen, 'rule': 'given by --exit-threshold' if exit_threshold is not None
                   else 'cheapest threshold within 1 point of the full accuracy',
                   'flops_saving': 1 - chosen['expected_gflops'] / gflops_per_exit[-1]},
        'real_early_exit': {'threshold': chosen['threshold'], 'seconds': real['seconds'],
                            'images_per_second': len(real['predictions']) / max(real['seconds'], 1e-9),
                            'mismatches_with_cache': mismatches},
        'training_rule': exit_point(cache, conditional_exit_choice(cache.gate_probs), gflops_per_exit),
        'conformal': conformal_report(cache, conformal),
        'timing': {'cached_pass_seconds': cached_pass_seconds},
        'full_network': class_report(cache.targets, cache.logits[-1].argmax(-1), class_names),
        'at_chosen_threshold': class_report(cache.targets, cached_predictions, class_names),
    }
    return results, cache


def format_results_table(results: dict) -> str:
    """The terminal report: per-exit accuracy, then one row per threshold."""
    exits = len(results['per_exit_accuracy'])
    lines = [f"{results.get('dataset', '')} {results.get('arch', '')} {results.get('input_size', '')}px, "
             f"{results['num_val']} validation images, exits after blocks {results['exit_positions']} + final",
             'exit          ' + ' '.join(f'{k:>7d}' for k in range(exits)),
             'GFLOPs        ' + ' '.join(f'{g:7.3f}' for g in results['gflops_per_exit']),
             'accuracy (%)  ' + ' '.join(f'{a:7.2f}' for a in results['per_exit_accuracy']),
             '',
             f"{'threshold':>9} {'acc %':>7} {'GFLOPs':>8} {'saving':>7}  exit shares (%)"]
    for point in results['sweep']:
        saving = 1 - point['expected_gflops'] / results['full_gflops']
        lines.append(f"{point['threshold']:9.2f} {point['accuracy']:7.2f} {point['expected_gflops']:8.3f} "
                     f"{100 * saving:6.1f}%  " + ' '.join(f'{100 * s:5.1f}' for s in point['exit_share']))
    chosen, real = results['chosen'], results['real_early_exit']
    lines += ['', f"chosen threshold {chosen['threshold']:.2f} ({chosen['rule']}): accuracy {chosen['accuracy']:.2f}% "
              f"vs full {results['full_accuracy']:.2f}%, {100 * chosen['flops_saving']:.1f}% fewer FLOPs",
              f"real early exit: {real['images_per_second']:.1f} images/s, predictions differing from the cache: "
              f"{real['mismatches_with_cache']}"]
    conformal = results.get('conformal')
    if conformal:
        lines += ['', f"conformal prediction sets (qhats calibrated on {conformal['calibrated_on']}; exits by "
                      f"{conformal['exit_rule']}): coverage % / mean set size",
                  f"{'alpha':>6} {'general':>15} {'per exit':>15}"]
        for row in conformal['overall']:
            general, gated = row['general'], row['gated']
            lines.append(f"{row['alpha']:6.3f} {general['coverage']:8.2f} / {general['mean_set_size']:4.2f} "
                         f"{gated['coverage']:8.2f} / {gated['mean_set_size']:4.2f}")
    return '\n'.join(lines)
