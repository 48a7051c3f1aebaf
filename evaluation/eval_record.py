"""The typed --eval record: frozen dataclasses whose `to_json()` is results.json, and whose field metadata (unit,
meaning, when present) generate docs/RESULTS_JSON.md, so the file users script against is documented key by key."""
import dataclasses
import sys
import types
from dataclasses import dataclass
from pathlib import Path

DOC_PATH = Path(__file__).resolve().parent.parent / 'docs' / 'RESULTS_JSON.md'
# what an operating point (an entry of front, sweep, baselines.*.front, baselines.single_exit.points) holds
POINT = ('threshold, accuracy (%), expected_gflops (GFLOPs per image), exit_share (fraction of images per exit) '
         'and expected_latency_ms (batch-1 ms per image)')
RULE_PICKED = '--risk-control crc or ltt chose the threshold (no --exit-threshold)'


def key(doc: str, unit: str = '', when: str = 'always'):
    """A results.json key: its meaning, its unit ('' when it has none) and when it is present or not null."""
    return dataclasses.field(metadata={'doc': doc, 'unit': unit, 'when': when})


@dataclass(frozen=True)
class Record:
    """A results.json object: its fields are its keys."""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class LatencyTable(Record):
    """Batch-1 latency measured per segment on this machine: what latency budgets and predictions read."""

    segment: list[float] = key('median batch-1 time of each segment: the blocks up to an exit, its head and gate, and '
                                  'the decision to leave', 'ms')
    cumulative: list[float] = key('batch-1 time to reach and run each exit: the running sum of `segment`', 'ms')
    batch: int = key('batch size of the measurement (always 1)', 'images')
    device: str = key('the device measured on, e.g. cpu or cuda:0')


@dataclass(frozen=True)
class SelectionReport(Record):
    """How the threshold was chosen (on which images, by which budget and rule) and what it measures."""

    set: str = key("the images the threshold was chosen on: 'calibration' (held out by --calib-ratio) or 'val'")
    num_images: int = key('how many images the threshold was chosen on', 'images')
    budget: str = key("the budget that chose it (e.g. 'acc-drop=1'), or '--exit-threshold T' when given")
    threshold: float = key('the chosen gate threshold', 'probability')
    accuracy: float = key('accuracy at the chosen threshold on the validation images', '%')
    expected_gflops: float = key('mean cost per validation image at the chosen threshold', 'GFLOPs')
    expected_latency_ms: float = key('predicted mean batch-1 time per validation image (from latency_table_ms)', 'ms')
    measured_latency_ms: float = key('measured mean batch-1 time of real early exit (real_early_exit.mean_ms)', 'ms')
    on_selection_set: dict = key('accuracy (%), expected_gflops and expected_latency_ms of the threshold on the '
                                 'images it was chosen on')
    risk_control: str = key("the selection rule: 'none' (empirical), 'crc' or 'ltt' (--risk-control)")
    guarantee: str = key("what the rule promises on new images; 'none' when chosen on the validation images")
    out_of_sample: bool = key('whether the threshold was chosen on other images than the validation images')
    risk_loss: str = key('the per-image loss the risk is measured in (--risk-loss)')
    risk_level: float | None = key('the risk the budget allows (acc-drop / 100)', 'fraction', 'acc-drop budgets')
    delta: float | None = key("the rule's failure probability (--delta)", 'probability', "--risk-control ltt")
    certified: bool | None = key('whether the rule certified a threshold out of sample', '', RULE_PICKED)
    needed_images: int | None = key('how many selecting images the rule needs to certify anything', 'images',
                                    RULE_PICKED)
    risk_bound: float | None = key('the risk the rule guarantees (0 when it fell back to the final exit)', 'fraction',
                                   f'{RULE_PICKED}, unless certified on the validation images themselves')
    calibration_risk: float = key('mean loss at the threshold on the images it was chosen on', 'fraction')
    val_risk: float = key('mean loss at the threshold on the validation images', 'fraction')


@dataclass(frozen=True)
class Chosen(Record):
    """The chosen operating point, measured on the validation images."""

    threshold: float = key('the chosen gate threshold: an image leaves at the first gate at or above it',
                           'probability')
    accuracy: float = key('accuracy on the validation images at that threshold', '%')
    expected_gflops: float = key('mean cost per validation image', 'GFLOPs')
    exit_share: list[float] = key('fraction of the validation images leaving at each exit', 'fraction')
    expected_latency_ms: float = key('predicted mean batch-1 time per image', 'ms')
    rule: str = key('what chose it: the budget, or --exit-threshold T (as selection.budget)')
    flops_saving: float = key('1 - expected_gflops / full_gflops', 'fraction')


@dataclass(frozen=True)
class Baselines(Record):
    """Early exit without the checkpoint's gates, from the same cached pass, chosen by the same budget and rule."""

    max_prob: dict = key('early exit at a threshold on the exit head\'s max softmax probability: `front` (points), '
                         '`at_budget` (the point the budget picks, chosen as the gates\' is) and `risk` (the '
                         'selection fields of `selection`, risk_control to val_risk, for this rule)')
    entropy: dict = key('as max_prob, thresholding the negative entropy of the exit head\'s softmax')
    single_exit: dict = key('each exit alone: `points` (one point per exit, without threshold), `at_budget` (the '
                            'cheapest exit keeping the budget on the selecting images, or null) and `out_of_sample`')


@dataclass(frozen=True)
class VersusBaselines(Record):
    """The checkpoint's gates against the best baseline at the same budget, on the validation images."""

    best_baseline: str = key('the baseline rule doing best at the budget (max_prob, entropy or single_exit)')
    baseline_accuracy: float = key("its accuracy at the budget on the validation images", '%')
    baseline_gflops: float = key('its mean cost per image there', 'GFLOPs')
    baseline_keeps_budget: bool = key('whether it keeps the budget on the validation images')
    gates_accuracy: float = key("the checkpoint's gates' accuracy at the chosen threshold", '%')
    gates_gflops: float = key("the checkpoint's gates' mean cost per image there", 'GFLOPs')
    gates_keep_budget: bool = key("whether the checkpoint's gates keep the budget on the validation images")
    winner: str = key("'learned gates' (the checkpoint's gates, whichever `gate` names), 'tie' or the baseline's "
                      'name: keeping the budget first, then cheaper (acc-drop budgets) or more accurate (cost budgets)')


@dataclass(frozen=True)
class RealEarlyExit(Record):
    """Real early exit at batch 1 at the chosen threshold: measured time, and agreement with the cache."""

    threshold: float = key('the threshold real early exit ran at (the chosen one)', 'probability')
    batch: int = key('batch size (always 1)', 'images')
    images: int = key('how many validation images ran (up to 64, as time allows)', 'images')
    mean_ms: float = key('measured mean time per image', 'ms')
    median_ms: float = key('measured median time per image', 'ms')
    predicted_mean_ms: float = key('what latency_table_ms predicts for the same images at their exits', 'ms')
    mismatches_with_cache: int = key('images whose prediction or exit differ from the cached pass (0 expected)',
                                     'images')


@dataclass(frozen=True)
class ExitPoint(Record):
    """An exit rule's outcome on the validation images: accuracy, cost and where the images leave."""

    accuracy: float = key('accuracy on the validation images', '%')
    expected_gflops: float = key('mean cost per validation image', 'GFLOPs')
    exit_share: list[float] = key('fraction of the images leaving at each exit', 'fraction')
    exit_accuracy: list[float] = key('accuracy of the images leaving at each exit (0 where none leave)', '%')


@dataclass(frozen=True)
class Oracle(ExitPoint):
    """Each image at its earliest right exit (else the final one): the most any exit rule can save."""

    expected_latency_ms: float = key('predicted mean batch-1 time per image', 'ms')
    flops_saving: float = key("the oracle's FLOPs saving against the full network", 'fraction')
    captured_share: float | None = key("the share of the oracle's saving the chosen point captures", 'fraction',
                                       'the oracle saves anything')


@dataclass(frozen=True)
class Conformal(Record):
    """Conformal prediction sets on the validation images: coverage and mean set size per alpha."""

    calibrated_on: str = key('which images the qhats were fit on')
    in_sample: bool = key('whether they were fit on the validation images themselves (coverage by construction)')
    exit_rule: str = key('how each image picks its exit: training-time gating (a_k >= 0.5)')
    reported_on: str = key('where coverage is measured: the validation images')
    thresholds: dict = key('the qhats: alphas and per-alpha thresholds, general and per exit')
    overall: list[dict] = key('per alpha: coverage (%) and mean_set_size (classes) of the general and the '
                              'per-exit sets')
    per_exit: list[dict] = key('the same per exit the images leave at')


@dataclass(frozen=True)
class Timing(Record):
    """Wall time of the evaluation, on the machine it ran on."""

    cached_pass_seconds: float = key('wall time of the cached pass(es) over the images', 's')
    total_seconds: float = key('wall time of the whole evaluation', 's')


@dataclass(frozen=True)
class ClassReport(Record):
    """A per-class report: precision, recall, F1 and the confusion matrix."""

    per_class: list[dict] = key('per class: class, precision, recall, f1 (%) and support (images)')
    confusion_matrix: list[list[int]] = key('counts, rows the true class, columns the predicted one', 'images')


@dataclass(frozen=True)
class EvalReport(Record):
    """What evaluate_early_exit measures: every key of results.json but the run's own."""

    num_classes: int = key('number of classes', 'classes')
    class_names: list[str] = key('the class names, in label order')
    num_val: int = key('validation images evaluated', 'images')
    exit_positions: list[int] = key('the blocks after which the intermediate exits sit (the final exit follows)')
    gate: str = key("the checkpoint's exit gate (--gate), after which the terminal report and the plot name the "
                    'rule its thresholds apply to')
    gflops_per_exit: list[float] = key('cost of an image leaving at each exit, the final one last', 'GFLOPs')
    full_gflops: float = key('cost of the full network (the last of gflops_per_exit)', 'GFLOPs')
    per_exit_accuracy: list[float] = key('accuracy of each exit on all validation images', '%')
    full_accuracy: float = key('accuracy of the final exit', '%')
    latency_table_ms: LatencyTable = key('measured batch-1 latency per exit')
    selection: SelectionReport = key('how the threshold was chosen and what the selection rule promises')
    front: list[dict] = key(f"the accuracy/GFLOPs Pareto front of the checkpoint's gates; each point: {POINT}")
    num_operating_points: int = key("distinct thresholds of the checkpoint's gates on the validation images")
    sweep: list[dict] = key('the printed rows: the --thresholds points (without expected_latency_ms), else about 12 '
                      'points of the front and the chosen one, most accurate first')
    chosen: Chosen = key('the chosen operating point on the validation images')
    baselines: Baselines = key("early exit without the checkpoint's gates, from the same cached pass")
    versus_baselines: VersusBaselines = key("the checkpoint's gates against the best baseline at the budget")
    real_early_exit: RealEarlyExit = key('real early exit at batch 1, checked against the cache')
    training_rule: ExitPoint = key('the operating point of the training-time exit rule (gate a_k >= 0.5)')
    oracle: Oracle = key('each image at its earliest right exit (else the final one): the best any rule can do')
    conformal: Conformal | None = key('conformal prediction sets on the validation images', '',
                                      'calibration images, or qhats stored in the checkpoint')
    timing: Timing = key('how long the evaluation took')
    full_network: ClassReport = key('per-class report of the final exit')
    at_chosen_threshold: ClassReport = key('per-class report of early exit at the chosen threshold')


@dataclass(frozen=True)
class EvalRun(Record):
    """results.json as --eval writes it: what was evaluated, then the report's keys beside these."""
    dataset: str = key('the --data-set evaluated')
    arch: str = key("the checkpoint's architecture")
    input_size: int = key('input resolution the model ran at', 'px')
    checkpoint: str = key('--checkpoint-path as given')
    device: str = key('the device the job ran on')
    partial: bool = key('whether only part of the validation images were read (--barely_train)')
    num_val_total: int = key('validation images in the split', 'images')
    split: dict = key("the split the images come from: method, ratios, seed, hashes of the file lists "
                      "(hash, val_hash, calib_hash), image counts, and `file`, the split file's path or null")
    report: EvalReport = key('(not a key) the report, whose keys sit beside these')

    def to_json(self) -> dict:
        run = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != 'report'}
        return {**run, **self.report.to_json()}


def nested_record(annotation) -> type | None:
    """The Record class a field holds (alone or or None), else None."""
    options = annotation.__args__ if isinstance(annotation, types.UnionType) else (annotation,)
    return next((t for t in options if isinstance(t, type) and issubclass(t, Record)), None)


def type_name(annotation) -> str:
    """A field's type as the docs table shows it: 'list[float]', 'float or null'."""
    if isinstance(annotation, types.UnionType):
        return ' or '.join('null' if t is type(None) else type_name(t) for t in annotation.__args__)
    return annotation.__name__ if isinstance(annotation, type) else str(annotation)


def key_rows(cls: type, prefix: str = '') -> list[str]:
    """The markdown table rows of one record's keys."""
    rows = []
    for f in dataclasses.fields(cls):
        if f.name == 'report':
            continue
        nested = nested_record(f.type)
        kind = f'object ([below](#{f.name}))' if nested else type_name(f.type)
        meta = f.metadata
        rows.append(f"| `{prefix}{f.name}` | {kind} | {meta['unit'] or '-'} | {meta['doc']} | {meta['when']} |")
    return rows


def results_json_doc() -> str:
    """docs/RESULTS_JSON.md, generated from the records' field metadata."""
    header = ['| key | type | unit | meaning | present |', '|---|---|---|---|---|']
    lines = ['# results.json', '',
             '`--eval` writes results.json (beside the checkpoint, or at --results-json / in --output-dir). Every key '
             'is listed here, generated from `evaluation/eval_record.py` by '
             '`python -m evaluation.eval_record` (a test checks this page is current). Percentages are 0-100, '
             "fractions 0-1; 'present' says when a key holds a value (otherwise it is null).", '',
             '## Top level', '', *header, *key_rows(EvalRun), *key_rows(EvalReport)]
    for f in dataclasses.fields(EvalReport):
        nested = nested_record(f.type)
        if nested:
            lines += ['', f'## {f.name}', '', nested.__doc__, '', *header, *key_rows(nested, f'{f.name}.')]
    return '\n'.join(lines) + '\n'


if __name__ == '__main__':
    DOC_PATH.write_text(results_json_doc())
    sys.stdout.write(f'wrote {DOC_PATH}\n')
