"""--eval: the early-exit report. One cached pass over the validation (and calibration) images gives per-exit
accuracy and every operating point; a budget picks the threshold on the calibration images; real early exit
then runs at that threshold, batch 1, and must agree with the cache."""
import time

import torch

from errors import GFNetDynnError
from evaluation.conformal import conformal_thresholds, prediction_set_stats
from evaluation.eval_record import (Baselines, ClassReport, Chosen, Conformal, EvalReport, ExitPoint, LatencyTable,
                                    Oracle, RealEarlyExit, SelectionReport, Timing, VersusBaselines)
from evaluation.exit_cache import (ExitCache, collect_exit_outputs, conditional_exit_choice, exit_point,
                                   gated_predictions, oracle_exit_choice, per_exit_accuracy, threshold_sweep)
from evaluation.latency import cumulative_ms, measured_early_exit_ms, segment_latency_ms, spread_indices
from evaluation.operating_points import (BASELINE_RULES, DEFAULT_BUDGET, Budget, all_points, choose, choose_single_exit,
                                         exit_scores, parse_budget, pareto_front, point_table, single_exit_points)
from evaluation.risk_control import (GUARANTEES, LTT_GRID, RiskControl, Selection, ThresholdScan, scan, scan_thresholds,
                                     select)
from models.early_exit_net import EarlyExitNetwork
from models.gates import GATES


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


def conformal_report(cache: ExitCache, stored: dict | None,
                     calibration: ExitCache | None = None) -> Conformal | None:
    """Coverage and mean size of the conformal prediction sets on the validation images. With calibration images
    (--calib-ratio) the qhats are fit on them, so the coverage is measured out of sample; without, the qhats the
    checkpoint stored are used, fit on these same validation images, so the coverage holds by construction
    (`in_sample` says which). None without either."""
    rule = {'exit_rule': 'training-time gating (a_k >= 0.5)', 'reported_on': 'validation images'}
    if calibration is not None:
        thresholds = conformal_thresholds(calibration, conditional_exit_choice(calibration.gate_probs))
        fit = {'calibrated_on': f'the {calibration.targets.numel()} calibration images (--calib-ratio)',
               'in_sample': False}
    elif isinstance(stored, dict) and 'alphas' in stored:
        thresholds = stored
        fit = {'calibrated_on': 'the validation images, when the checkpoint was written', 'in_sample': True}
    else:
        return None
    return Conformal(**fit, **rule, thresholds=thresholds,
                     **prediction_set_stats(cache, conditional_exit_choice(cache.gate_probs), thresholds))


LATENCY_IMAGES = 64  # validation images real early exit runs at batch 1 to measure its mean latency
TABLE_ROWS = 12  # rows of the printed sweep when --thresholds is not given


def points_by_rule(cache: ExitCache, gflops: list[float], latency_ms: list[float]) -> dict[str, list[dict]]:
    """Every distinct operating point of the learned gates and of each baseline rule, on one set of images."""
    return {rule: all_points(cache, rule, gflops, latency_ms) for rule in ('gate', *BASELINE_RULES)}


def point_at(cache: ExitCache, rule: str, threshold: float, gflops: list[float], latency_ms: list[float]) -> dict:
    """The operating point of `rule` at one threshold."""
    return point_table(cache, exit_scores(cache, rule), torch.tensor([threshold], dtype=torch.float64), gflops,
                       latency_ms)[0]


def risk_scan(cache: ExitCache, rule: str, loss: str, thresholds: torch.Tensor | None = None) -> ThresholdScan:
    """The per-image losses of `rule` over its scan (or the given thresholds) on one set of images."""
    scores = exit_scores(cache, rule)
    return scan(cache.logits.argmax(dim=-1), cache.targets, scores,
                scan_thresholds(scores) if thresholds is None else thresholds, loss)


def loss_at(cache: ExitCache, rule: str, threshold: float, loss: str) -> float:
    """The mean per-image loss of `rule` at one threshold."""
    at = risk_scan(cache, rule, loss, torch.tensor([threshold], dtype=torch.float64))
    return float(at.loss[0]) / max(at.n, 1)


def pick_threshold(selecting: ExitCache, points: list[dict], rule: str, budget: Budget,
                   risk: RiskControl) -> tuple[float, Selection | None]:
    """The threshold of `rule` the budget picks on the selecting images: the empirical rule's (`choose`), or
    the risk-control rule's with its certificate."""
    if risk.rule == 'none':
        return choose(points, budget, per_exit_accuracy(selecting)[-1])['threshold'], None
    grid = LTT_GRID if risk.rule == 'ltt' else None  # LTT tests a grid fixed before calibration
    picked = select(risk_scan(selecting, rule, risk.loss, grid), risk.rule, budget.value / 100, risk.delta)
    return picked.threshold, picked


def risk_fields(selecting: ExitCache, val: ExitCache, rule: str, threshold: float, budget: Budget,
                risk: RiskControl, certificate: Selection | None) -> dict:
    """What the selection rule promises for `rule` at `threshold` and the loss it measures: on the selecting
    images and on the validation images. Chosen on the validation images themselves (no calibration images), it
    promises nothing: guarantee 'none', certified False."""
    out_of_sample = selecting is not val
    certified = (certificate.certified and out_of_sample) if certificate else None
    in_sample_pick = certificate is not None and certificate.certified and not out_of_sample
    return {'risk_control': risk.rule, 'guarantee': GUARANTEES[risk.rule] if out_of_sample else 'none',
            'out_of_sample': out_of_sample, 'risk_loss': risk.loss,
            'risk_level': budget.value / 100 if budget.kind == 'acc-drop' else None,
            'delta': risk.delta if risk.rule == 'ltt' else None, 'certified': certified,
            'needed_images': certificate.needed_images if certificate else None,
            # the final exit, chosen when nothing is certified, loses nothing against itself
            'risk_bound': (None if certificate is None or in_sample_pick else
                           budget.value / 100 if certified else 0.0),
            'calibration_risk': loss_at(selecting, rule, threshold, risk.loss),
            'val_risk': loss_at(val, rule, threshold, risk.loss)}


def baselines_report(val: ExitCache, val_points: dict, selecting: ExitCache, selecting_points: dict,
                     budget: Budget, gflops: list[float], latency_ms: list[float], risk: RiskControl) -> dict:
    """Early exit without learned gates, from the same cache: thresholds on max softmax probability and on
    entropy (their validation fronts, the point the budget picks on the selecting images with the same
    selection rule as the gates, and its loss), and each exit alone."""
    selecting_full = per_exit_accuracy(selecting)[-1]
    report = {}
    for rule in BASELINE_RULES:
        threshold, certificate = pick_threshold(selecting, selecting_points[rule], rule, budget, risk)
        report[rule] = {'front': pareto_front(val_points[rule]),
                        'at_budget': point_at(val, rule, threshold, gflops, latency_ms),
                        'risk': risk_fields(selecting, val, rule, threshold, budget, risk, certificate)}
    picked = choose_single_exit(single_exit_points(selecting, gflops, latency_ms), budget, selecting_full)
    points = single_exit_points(val, gflops, latency_ms)
    report['single_exit'] = {'points': points, 'at_budget': points[picked['exit']] if picked else None,
                             'out_of_sample': selecting is not val}
    return report


def versus_baselines(learned: dict, baselines: dict, budget: Budget, full_accuracy: float) -> dict:
    """Learned gates against the best baseline at the budget, on the validation images: a point that keeps the
    budget there beats one that does not; then, under an accuracy-drop budget the cheaper wins, under a cost
    budget the more accurate."""
    def keeps_budget(point) -> bool:
        if budget.kind == 'acc-drop':
            return point['accuracy'] >= full_accuracy - budget.value - 1e-9
        key = 'expected_gflops' if budget.kind == 'gflops' else 'expected_latency_ms'
        return point[key] <= budget.value + 1e-12

    def score(point):
        if budget.kind == 'acc-drop':
            return keeps_budget(point), -point['expected_gflops'], point['accuracy']
        return keeps_budget(point), point['accuracy'], -point['expected_gflops']
    name, best = max(((n, b['at_budget']) for n, b in baselines.items() if b['at_budget']),
                     key=lambda item: score(item[1]))
    winner = 'learned gates' if score(learned) > score(best) else 'tie' if score(learned) == score(best) else name
    return {'best_baseline': name, 'baseline_accuracy': best['accuracy'],
            'baseline_gflops': best['expected_gflops'], 'baseline_keeps_budget': keeps_budget(best),
            'gates_accuracy': learned['accuracy'], 'gates_gflops': learned['expected_gflops'],
            'gates_keep_budget': keeps_budget(learned), 'winner': winner}


def oracle_report(cache: ExitCache, gflops: list[float], latency_ms: list[float], chosen: dict) -> dict:
    """The oracle on the validation images (each image at its earliest right exit, else the final one): accuracy,
    expected GFLOPs and batch-1 ms, and the share of its FLOPs saving that the chosen point captures."""
    point = exit_point(cache, oracle_exit_choice(cache), gflops)
    saving = gflops[-1] - point['expected_gflops']
    share = torch.tensor(point['exit_share'], dtype=torch.float64)
    return {**point, 'expected_latency_ms': float(share @ torch.tensor(latency_ms, dtype=torch.float64)),
            'flops_saving': saving / gflops[-1],
            # None when the oracle saves nothing (every image needs the final exit)
            'captured_share': (gflops[-1] - chosen['expected_gflops']) / saving if saving > 0 else None}


def cached_passes(model: EarlyExitNetwork, val_loader, calib_loader, device: torch.device, max_batches: int | None,
                  amp: bool) -> tuple[ExitCache, ExitCache]:
    """The one pass over the validation images, and the cache the threshold is chosen on: the calibration
    images' when they are held out, else the same validation cache."""
    cache = collect_exit_outputs(model, val_loader, device, max_batches=max_batches, amp=amp)
    if cache.targets.numel() == 0:
        raise GFNetDynnError('the validation set is empty; put images in the val folder')
    selecting = (collect_exit_outputs(model, calib_loader, device, max_batches=max_batches, amp=amp)
                 if calib_loader is not None else cache)
    return cache, selecting


def evaluate_early_exit(model: EarlyExitNetwork, val_loader, device: torch.device, *, gflops_per_exit: list[float],
                        class_names: list[str], budget: Budget = parse_budget(DEFAULT_BUDGET),
                        risk: RiskControl = RiskControl(), exit_threshold: float | None = None,
                        thresholds: list[float] | None = None,
                        calib_loader=None, conformal: dict | None = None, max_batches: int | None = None,
                        amp: bool = False) -> tuple[EvalReport, ExitCache]:
    """Everything --eval reports (the record docs/RESULTS_JSON.md documents): the threshold picked on the
    calibration images (the validation images without them) by the budget and the risk rule, every number
    reported on the validation images."""
    started = time.perf_counter()
    cache, selecting = cached_passes(model, val_loader, calib_loader, device, max_batches, amp)
    cached_pass_seconds = time.perf_counter() - started
    latency_indices = spread_indices(int(cache.targets.numel()), LATENCY_IMAGES)
    images = [val_loader.dataset[i][0].unsqueeze(0) for i in latency_indices]
    segment_ms = segment_latency_ms(model, images[0], device, seconds=0.1 * cached_pass_seconds)
    latency = cumulative_ms(segment_ms)
    val_points = points_by_rule(cache, gflops_per_exit, latency)
    selecting_points = val_points if calib_loader is None else points_by_rule(selecting, gflops_per_exit, latency)
    threshold, certificate = (pick_threshold(selecting, selecting_points['gate'], 'gate', budget, risk)
                              if exit_threshold is None else (exit_threshold, None))
    picked = point_at(selecting, 'gate', threshold, gflops_per_exit, latency)
    chosen = point_at(cache, 'gate', picked['threshold'], gflops_per_exit, latency)
    predictions, exits = gated_predictions(cache, chosen['threshold'])
    real = real_early_exit_report(model, images, latency_indices, device, (predictions, exits), chosen, latency,
                                  0.25 * cached_pass_seconds)
    baselines = baselines_report(cache, val_points, selecting, selecting_points, budget, gflops_per_exit, latency,
                                 risk)
    accuracies = per_exit_accuracy(cache)
    front = pareto_front(val_points['gate'])
    report = EvalReport(
        num_classes=len(class_names), class_names=class_names, num_val=int(cache.targets.numel()),
        exit_positions=list(model.exit_positions), gate=model.gate_type, gflops_per_exit=gflops_per_exit,
        full_gflops=gflops_per_exit[-1], per_exit_accuracy=accuracies, full_accuracy=accuracies[-1],
        latency_table_ms=LatencyTable(segment=segment_ms, cumulative=latency, batch=1, device=str(device)),
        selection=selection_report(selecting, cache, picked, chosen, real, budget, risk, certificate,
                                   exit_threshold, calibrated=calib_loader is not None),
        front=front, num_operating_points=len(val_points['gate']),
        sweep=(threshold_sweep(cache, thresholds, gflops_per_exit) if thresholds
               else table_rows(front, chosen, TABLE_ROWS)),
        chosen=Chosen(**chosen, rule=budget_rule(budget, exit_threshold),
                      flops_saving=1 - chosen['expected_gflops'] / gflops_per_exit[-1]),
        baselines=Baselines(**baselines),
        versus_baselines=VersusBaselines(**versus_baselines(chosen, baselines, budget, accuracies[-1])),
        real_early_exit=RealEarlyExit(**real),
        training_rule=ExitPoint(**exit_point(cache, conditional_exit_choice(cache.gate_probs), gflops_per_exit)),
        oracle=Oracle(**oracle_report(cache, gflops_per_exit, latency, chosen)),
        conformal=conformal_report(cache, conformal, selecting if calib_loader is not None else None),
        timing=Timing(cached_pass_seconds=cached_pass_seconds, total_seconds=time.perf_counter() - started),
        full_network=ClassReport(**class_report(cache.targets, cache.logits[-1].argmax(-1), class_names)),
        at_chosen_threshold=ClassReport(**class_report(cache.targets, predictions, class_names)))
    return report, cache


def budget_rule(budget: Budget, exit_threshold: float | None) -> str:
    """What chose the point, as results.json names it: the budget, or the given --exit-threshold."""
    return str(budget) if exit_threshold is None else f'--exit-threshold {exit_threshold:g}'


def selection_report(selecting: ExitCache, val: ExitCache, picked: dict, chosen: dict, real: dict, budget: Budget,
                     risk: RiskControl, certificate: Selection | None, exit_threshold: float | None, *,
                     calibrated: bool) -> SelectionReport:
    """How the threshold was chosen, what it measures on the validation images and on the selecting images,
    and what the selection rule promises."""
    return SelectionReport(
        set='calibration' if calibrated else 'val', num_images=int(selecting.targets.numel()),
        budget=budget_rule(budget, exit_threshold), threshold=chosen['threshold'], accuracy=chosen['accuracy'],
        expected_gflops=chosen['expected_gflops'], expected_latency_ms=chosen['expected_latency_ms'],
        measured_latency_ms=real['mean_ms'],
        on_selection_set={key: picked[key] for key in ('accuracy', 'expected_gflops', 'expected_latency_ms')},
        # without calibration images the rule chose on the images it is judged on: out_of_sample False
        **risk_fields(selecting, val, 'gate', chosen['threshold'], budget, risk, certificate))


def real_early_exit_report(model: EarlyExitNetwork, images: list[torch.Tensor], indices: list[int],
                           device: torch.device, cached: tuple[torch.Tensor, torch.Tensor], chosen: dict,
                           latency: list[float], seconds: float) -> dict:
    """Real early exit at the chosen threshold, batch 1, over `images` (the validation images at `indices`, for
    about `seconds`): mean and median ms beside what the latency table predicts for the same images, and
    agreement with the cache's (predictions, exits) for them."""
    single = measured_early_exit_ms(model, images, device, chosen['threshold'], seconds)
    ran = indices[:single['images']]
    cached_predictions, cached_exits = cached
    mismatches = sum(int(cached_predictions[i]) != p or int(cached_exits[i]) != e
                     for i, p, e in zip(ran, single['predictions'], single['exit_index']))
    predicted = sum(latency[k] for k in single['exit_index']) / max(len(ran), 1)
    return {'threshold': chosen['threshold'], 'batch': 1, 'images': single['images'],
            'mean_ms': single['mean_ms'], 'median_ms': single['median_ms'], 'predicted_mean_ms': predicted,
            'mismatches_with_cache': mismatches}


def risk_line(selection: dict) -> str:
    """One line: which rule chose the point, what it guarantees, and the loss measured."""
    measured = (f"{selection['risk_loss']} loss {selection['calibration_risk']:.4f} on the {selection['num_images']} "
                f"{selection['set']} images, {selection['val_risk']:.4f} on the validation images")
    rule, level = selection['risk_control'], selection['risk_level']
    if rule == 'none':
        how = ('the given --exit-threshold' if selection['budget'].startswith('--exit-threshold')
               else 'empirical (--risk-control none)')
        return f'selection rule: {how}, no guarantee; {measured}'
    if not selection['out_of_sample'] and selection['needed_images'] is None:
        return (f'selection rule: {rule} at risk {level:g}, chosen on the validation images themselves: no guarantee '
                f'(train with --calib-ratio 0.1 to hold images out for it); {measured}')
    if not selection['certified']:
        delta = f", delta {selection['delta']:g}" if selection['delta'] is not None else ''
        return (f"selection rule: {rule}: nothing certifiable with {selection['num_images']} {selection['set']} "
                f"images at risk {level:g}{delta} (needs at least {selection['needed_images']}): the final exit is chosen "
                f"(no early exit); {measured}")
    promise = (f'expected loss on a new image <= {level:g}, marginal over the calibration images and that image'
               if rule == 'crc' else f"risk (expected loss on new images) <= {level:g} with probability >= "
                                     f"{1 - selection['delta']:g} over the calibration draw")
    return f'selection rule: {rule}: {promise}; {measured}'


def budget_line(results: dict) -> str | None:
    """One line: whether the budget the point was chosen for held on the validation images, and what was
    measured there (None when --exit-threshold fixed the point)."""
    selection, chosen = results['selection'], results['chosen']
    if selection['budget'].startswith('--exit-threshold'):
        return None
    budget = parse_budget(selection['budget'])
    where = f"budget {budget} on the {results['num_val']} validation images"
    if budget.kind == 'acc-drop':
        lost = results['full_accuracy'] - chosen['accuracy']
        held = lost <= budget.value + 1e-9
        return (f"{where}: {'held' if held else 'BROKEN'}, the chosen point loses {lost:.2f} points "
                f"({chosen['accuracy']:.2f}% vs {results['full_accuracy']:.2f}% for the full network)")
    key, unit = ('expected_gflops', 'GFLOPs') if budget.kind == 'gflops' else ('expected_latency_ms', 'ms')
    held = chosen[key] <= budget.value + 1e-12
    return f"{where}: {'held' if held else 'BROKEN'}, the chosen point costs {chosen[key]:.4g} {unit} per image"


def oracle_line(results: dict) -> str:
    """One line: the oracle's accuracy and saving, and the share of that saving the chosen point captures."""
    oracle, chosen = results['oracle'], results['chosen']
    captured = ('nothing to capture' if oracle['captured_share'] is None else
                f"the chosen point captures {100 * oracle['captured_share']:.1f}% of it")
    return (f"oracle (each image at its earliest right exit): {oracle['accuracy']:.2f}% with "
            f"{100 * oracle['flops_saving']:.1f}% fewer FLOPs; {captured} "
            f"({100 * chosen['flops_saving']:.1f}% fewer)")


def table_rows(front: list[dict], chosen: dict, rows: int) -> list[dict]:
    """About `rows` points of the front, evenly spread by position, most accurate first, with the chosen one."""
    if len(front) > rows:
        picks = {round(i * (len(front) - 1) / (rows - 1)) for i in range(rows)}
        front = [p for i, p in enumerate(front) if i in picks or p['threshold'] == chosen['threshold']]
    if all(p['threshold'] != chosen['threshold'] for p in front):
        front = front + [chosen]  # a threshold given by --exit-threshold need not be on the front
    return sorted(front, key=lambda p: -p['threshold'])


def partial_note(results: dict) -> str:
    """'PARTIAL: 96 of 320' when --eval read only some of the validation images (--barely_train), else ''."""
    return f"PARTIAL: {results['num_val']} of {results['num_val_total']}" if results.get('partial') else ''


def format_results_table(results: dict) -> str:
    """The terminal report: per-exit accuracy and batch-1 latency, the sweep rows, the chosen point (which set
    chose it, predicted and measured latency) and the baselines at the same budget."""
    exits = len(results['per_exit_accuracy'])
    lines = [f"{results.get('dataset', '')} {results.get('arch', '')} {results.get('input_size', '')}px, "
             f"{partial_note(results) or str(results['num_val'])} validation images, exits at "
             f"{results['exit_positions']} + final",
             'exit          ' + ' '.join(f'{k:>7d}' for k in range(exits)),
             'GFLOPs        ' + ' '.join(f'{g:7.3f}' for g in results['gflops_per_exit']),
             'ms (batch 1)  ' + ' '.join(f'{m:7.2f}' for m in results['latency_table_ms']['cumulative']),
             'accuracy (%)  ' + ' '.join(f'{a:7.2f}' for a in results['per_exit_accuracy']),
             '', f"{results['num_operating_points']} distinct thresholds, {len(results['front'])} on the "
                 f"accuracy/GFLOPs front; {len(results['sweep'])} shown",
             f"{'threshold':>9} {'acc %':>7} {'GFLOPs':>8} {'saving':>7} {'ms':>7}  exit shares (%)"]
    for point in results['sweep']:
        saving = 1 - point['expected_gflops'] / results['full_gflops']
        ms = f"{point['expected_latency_ms']:7.2f}" if 'expected_latency_ms' in point else f"{'':>7}"
        lines.append(f"{point['threshold']:9.4f} {point['accuracy']:7.2f} {point['expected_gflops']:8.3f} "
                     f"{100 * saving:6.1f}% {ms}  " + ' '.join(f'{100 * s:5.1f}' for s in point['exit_share']))
    chosen, real, selection = results['chosen'], results['real_early_exit'], results['selection']
    lines += ['', f"chosen threshold {chosen['threshold']:.4f} ({selection['budget']}, chosen on the "
                  f"{selection['num_images']} {selection['set']} images): accuracy {chosen['accuracy']:.2f}% vs full "
                  f"{results['full_accuracy']:.2f}%, {100 * chosen['flops_saving']:.1f}% fewer FLOPs"]
    if selection['set'] == 'val':
        lines.append('  (chosen on the validation images it is reported on, so optimistic: train with '
                     '--calib-ratio 0.1 to choose on held-out images)')
    lines.append(risk_line(selection))
    lines += [line for line in (budget_line(results), oracle_line(results)) if line]
    lines += [f"batch-1 latency: predicted {selection['expected_latency_ms']:.2f} ms per image, measured "
              f"{real['mean_ms']:.2f} ms mean over {real['images']} images (predicted for them "
              f"{real['predicted_mean_ms']:.2f}); full network {results['latency_table_ms']['cumulative'][-1]:.2f} ms; "
              f"exits differing from the cache: {real['mismatches_with_cache']}"]
    versus, gates = results['versus_baselines'], GATES[results['gate']].rule
    misses = [name for name, keeps in ((gates, versus['gates_keep_budget']),
                                       (versus['best_baseline'], versus['baseline_keeps_budget'])) if not keeps]
    verdict = {'tie': 'tie', 'learned gates': f'{gates} win'}.get(versus['winner'], f"{versus['winner']} wins")
    lines.append(f"{gates} vs {versus['best_baseline']} at the same budget: {versus['gates_accuracy']:.2f}% at "
                 f"{versus['gates_gflops']:.3f} GFLOPs vs {versus['baseline_accuracy']:.2f}% at "
                 f"{versus['baseline_gflops']:.3f} GFLOPs: {verdict}"
                 + (f" ({' and '.join(misses)} miss{'es' if len(misses) == 1 else ''} the budget on the validation "
                    f"images)" if misses else ''))
    conformal = results.get('conformal')
    if conformal:
        lines += ['', f"conformal prediction sets on the validation images (qhats calibrated on "
                      f"{conformal['calibrated_on']}; exits by {conformal['exit_rule']}): coverage % / mean set size"]
        if conformal['in_sample']:
            lines.append('  (in-sample: the coverage holds by construction; train with --calib-ratio 0.1 to measure '
                         'it on held-out images)')
        lines.append(f"{'alpha':>6} {'general':>15} {'per exit':>15}")
        for row in conformal['overall']:
            general, gated = row['general'], row['gated']
            lines.append(f"{row['alpha']:6.3f} {general['coverage']:8.2f} / {general['mean_set_size']:4.2f} "
                         f"{gated['coverage']:8.2f} / {gated['mean_set_size']:4.2f}")
    return '\n'.join(lines)
