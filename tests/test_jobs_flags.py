"""Each flag declares its jobs, range, path-ness and --resume policy where it is defined; a value out of range is one
error line, exit 2, before any file is written; docs/FLAGS.md is generated from the declarations."""
import pytest

from deployment.exporters import EXPORTERS
from errors import GFNetDynnError
from jobs import resume
from jobs.flag_docs import DOC_PATH, flags_doc
from jobs.flags import DYNN, MAY_CHANGE, TRAINING, FlagFacts, add_flag, positive
from jobs.run_setup import RunData, run_args_dict
from main_dynn import get_args_parser, main


@pytest.mark.parametrize('flags, message', [
    (['--ce_ic_tradeoff', 'nan'], '--ce_ic_tradeoff must be >= 0, got nan'),
    (['--ce_ic_tradeoff', 'inf'], '--ce_ic_tradeoff must be finite, got inf'),
    (['--ce_ic_tradeoff', '-1'], '--ce_ic_tradeoff must be >= 0, got -1.0'),
    (['--transfer-ratio', 'inf'], '--transfer-ratio must lie in [0, 1], got inf'),
    (['--transfer-ratio', '-0.1'], '--transfer-ratio must lie in [0, 1], got -0.1'),
    (['--max-nan-skips', '-1'], '--max-nan-skips must be >= 0, got -1'),
    (['--max_warmup_epoch', '-1'], '--max_warmup_epoch must be >= 0, got -1'),
    (['--drop-path', '1'], '--drop-path must lie in [0, 1), got 1.0'),
    (['--lr', 'inf'], '--lr must lie in (0, 10], got inf'),
    (['--min-lr', 'nan'], '--min-lr must lie in [0, 10], got nan'),
    (['--eval', '--thresholds', '0.5', '1.2'], '--thresholds must lie in [0, 1], got 1.2'),
    (['--exit-threshold', '-0.1'], '--exit-threshold must lie in [0, 1], got -0.1'),
])
def test_a_value_out_of_its_flags_range_is_one_error_line_before_any_file(flags, message, tmp_path, monkeypatch,
                                                                          capsys):
    monkeypatch.chdir(tmp_path)
    assert main([*flags, '--output-dir', str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f'error: {message}'
    assert list(tmp_path.iterdir()) == []


def test_every_numeric_flag_declares_a_range():
    numeric = [a.option_strings[0] for a in get_args_parser()._actions if a.type in (int, float)]
    assert numeric and all(a.flag.check for a in get_args_parser()._actions if a.type in (int, float))


def test_a_flag_knows_its_jobs_where_it_is_defined():
    flags = FlagFacts(get_args_parser())
    assert flags['lr'].jobs == {'backbone', 'dynn'} and flags['ce_ic_tradeoff'].jobs == {'dynn'}
    assert flags['quantize'].jobs == {'export'} and flags['data_set'].jobs is None  # None: every job


def test_export_choices_come_from_the_exporter_registry():
    export = next(a for a in get_args_parser()._actions if a.dest == 'export')
    assert export.choices == sorted(EXPORTERS)


def test_every_flag_that_does_not_apply_is_named_in_one_line(tmp_path, monkeypatch, capsys):
    """A script reusing its training flags for --eval learns every flag to drop at once, not one per run."""
    monkeypatch.chdir(tmp_path)
    assert main(['--eval', '--checkpoint-path', 'c.pth', '--num_epoch', '8', '--lr', '0.01',
                 '--max_warmup_epoch', '4']) == 2
    err = capsys.readouterr().err.strip()
    assert err.count('\n') == 0 and err.startswith('error: --lr, --max_warmup_epoch, --num_epoch have no effect '
                                                   'with --eval')
    assert '--max_warmup_epoch to --stage dynn' in err and err.endswith('drop them')
    assert list(tmp_path.iterdir()) == []


def test_a_flag_given_at_its_default_value_is_accepted(tmp_path, monkeypatch, capsys):
    """--eval with the training run's own --ce_ic_tradeoff 0.75 (the default) changes nothing, so it is not an
    error: the job goes on to its next check (here, the missing checkpoint)."""
    monkeypatch.chdir(tmp_path)
    assert main(['--eval', '--checkpoint-path', 'missing.pth', '--ce_ic_tradeoff', '0.75', '--num_epoch', '100']) == 2
    err = capsys.readouterr().err
    assert 'no effect' not in err and 'missing.pth' in err


def test_docs_page_is_what_the_declarations_generate():
    assert DOC_PATH.read_text() == flags_doc(FlagFacts(get_args_parser())), \
        'run: python main_dynn.py --flags-doc > docs/FLAGS.md'


def test_docs_page_names_every_flag_with_its_facts():
    page = DOC_PATH.read_text()
    for action in FlagFacts(get_args_parser()).actions.values():
        assert all(f'`{name}`' in page for name in action.option_strings), action.option_strings
    assert "| `--data-path` | text | - |  | backbone, dynn, eval, export (--quantize) | yes | may change |" in page
    assert ('| `--exit-costs` | text | `reference` | `flops`, `latency`, `reference` | dynn |  | '
            'fixed; before: `flops` |') in page
    assert "| `--lr` | float | - | (0, 10] | backbone, dynn |  | fixed |" in page


def test_flags_doc_prints_the_page_and_exits(capsys):
    with pytest.raises(SystemExit) as stop:
        main(['--flags-doc'])
    assert stop.value.code == 0 and capsys.readouterr().out == DOC_PATH.read_text()


def _with_toy_flags() -> FlagFacts:
    """The real parser plus three flags declared in one place each, as a contributor would add them."""
    parser = get_args_parser()
    toy = parser.add_argument_group('toy')
    add_flag(toy, '--toy-dir', type=str, default=None, jobs=TRAINING, path=True, help='a folder the toy reads')
    add_flag(toy, '--toy-speed', type=int, default=1, jobs=TRAINING, on_resume=MAY_CHANGE, check=positive,
             help='how fast the toy runs')
    add_flag(toy, '--toy-mode', type=str, default='new', choices=['old', 'new'], jobs=DYNN, before_flag='old',
             help='what the toy does')
    return FlagFacts(parser)


def test_a_new_flag_declared_once_is_honoured_by_resume(tmp_path, monkeypatch):
    """Path-ness, resume policy and the behaviour before the flag, each given in its add_flag call alone: a relative
    path naming the recorded folder is the same run, another is refused, a may-change flag takes the new value,
    and a checkpoint from before --toy-mode resumes with 'old'."""
    flags = _with_toy_flags()
    stored = {'data_set': 'DEMO', 'ce_ic_tradeoff': 0.75, 'num_epoch': 5, 'toy_dir': str(tmp_path / 'toy'),
              'toy_speed': 1}
    monkeypatch.setattr(resume, 'load_resume_checkpoint',
                        lambda path, output_dir: {'args': dict(stored), 'stage': 'joint', 'epoch': 1})
    monkeypatch.chdir(tmp_path)
    last = tmp_path / 'checkpoint' / 'checkpoint_DEMO_0.75_confEE' / 'last.pth'
    args = flags.parser.parse_args(['--resume', str(last), '--toy-dir', 'toy', '--toy-speed', '3'])
    resumed = resume.resumed_args(args, {'resume', 'toy_dir', 'toy_speed'}, flags)[0]
    assert (resumed.toy_dir, resumed.toy_speed, resumed.toy_mode) == (str(tmp_path / 'toy'), 3, 'old')
    args = flags.parser.parse_args(['--resume', str(last), '--toy-dir', 'elsewhere'])
    with pytest.raises(GFNetDynnError, match='--toy-dir elsewhere would change the run'):
        resume.resumed_args(args, {'resume', 'toy_dir'}, flags)


def test_a_new_path_flag_is_recorded_absolute(tmp_path, monkeypatch):
    flags = _with_toy_flags()
    monkeypatch.chdir(tmp_path)
    args = flags.parser.parse_args(['--toy-dir', 'toy'])
    data = RunData(None, None, ['a', 'b'], tmp_path / 'data', {'method': 'folders'})
    recorded = run_args_dict(args, flags, {}, data, tmp_path / 'split.json')
    assert recorded['toy_dir'] == str(tmp_path.resolve() / 'toy') and recorded['toy_speed'] == 1


def test_a_new_flag_shows_in_the_docs_with_its_facts():
    page = flags_doc(_with_toy_flags())
    assert '## toy' in page
    assert '| `--toy-dir` | text | - |  | backbone, dynn | yes | fixed | a folder the toy reads |' in page
    assert '| `--toy-speed` | int | 1 | > 0 | backbone, dynn |  | may change | how fast the toy runs |' in page
    assert "| `--toy-mode` | text | `new` | `old`, `new` | dynn |  | fixed; before: `old` | what the toy does |" in page
