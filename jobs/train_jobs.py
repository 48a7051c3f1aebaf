"""--stage backbone and --stage dynn, wired from the command line's arguments: build, check the outputs, read
the data, claim the run folder, train."""
import argparse
import logging
from pathlib import Path

import torch

from errors import GFNetDynnError
from jobs.outputs import check_new_run, writable_location
from jobs.run_setup import (backbone_run_folder, build_data, check_class_count, check_split_file, checkpoint_args,
                            claim_run, dataset_num_classes, dynn_run_folder, make_writer, removed_on_bad_input,
                            resolve_model_shape, run_args_dict, save_split, warmup_folder)
from jobs.trained_run import RunArgs
from jobs.flags import FlagFacts, with_stage_defaults
from learning_helpers.backbone_recipe import (BackboneRecipe, base_criterion, build_backbone_optimizer,
                                              build_backbone_scheduler, build_mixup)
from learning_helpers.backbone_stage import BackboneStep, run_backbone_stage
from learning_helpers.checkpoint import suggested_checkpoint
from learning_helpers.dynn_training import dynn_optimizer, exit_cost_vector, train_dynn
from learning_helpers.joint_stage import JointConfig
from learning_helpers.losses import DistillationLoss, FrequencyDistillation, exit_distillation
from learning_helpers.stage_common import FRESH_START, RunConfig, resume_training
from learning_helpers.warmup_stage import WarmupConfig
from models import model_factory
from models.exit_costs import DEFAULT_EXIT_COSTS, EXIT_COSTS
from models.exit_heads import ExitHeadConfig
from models.weights import LoadReport, load_state
from runtime.distributed import is_main_process

DYNN_STAGES = ('warmup', 'joint')  # what a dynn-stage checkpoint says under 'stage'


def backbone_recipe(args: argparse.Namespace) -> BackboneRecipe:
    return BackboneRecipe(
        opt=args.opt, lr=args.lr, lr_base_batch=args.lr_base_batch, weight_decay=args.wd, min_lr=args.min_lr,
        warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs, cooldown_epochs=args.cooldown_epochs,
        num_epochs=args.num_epoch, clip_grad=args.clip_grad, smoothing=args.smoothing, mixup=args.mixup,
        cutmix=args.cutmix, mixup_prob=args.mixup_prob, mixup_switch_prob=args.mixup_switch_prob,
        mixup_mode=args.mixup_mode)


def build_criterion(args: argparse.Namespace, student: torch.nn.Module, num_classes: int, shape: dict,
                    device: torch.device) -> DistillationLoss:
    """The recipe's CE (soft-target under Mixup), mixed with distillation from the --teacher-model when asked."""
    base = base_criterion(backbone_recipe(args))
    teacher, frequency = None, None
    if args.distillation_type == 'freq' and not hasattr(student, 'forward_tokens'):
        raise GFNetDynnError(f"--distillation-type freq compares token maps and needs a GFNet student, not --arch "
                             f"{shape['arch']}; use soft or hard for other students")
    if args.distillation_type != 'none':
        teacher = model_factory.build_teacher(args.teacher_model, args.teacher_path, num_classes,
                                              shape['input_size'], shape['patch_size']).to(device)
        if args.distillation_type == 'freq':
            if not hasattr(teacher, 'forward_tokens'):
                raise GFNetDynnError('--distillation-type freq compares token maps and needs a GFNet teacher '
                                     '(e.g. --teacher-model GFNet-b-dynn); use soft for other teachers')
            frequency = FrequencyDistillation(student.embed_dim, teacher.embed_dim, len(student.blocks),
                                              len(teacher.blocks))
    return DistillationLoss(base, teacher, args.distillation_type, args.distillation_alpha, args.distillation_tau,
                            frequency, args.distillation_freq_weight).to(device)


def run_config(args: argparse.Namespace, run_folder: Path, run_args: dict) -> RunConfig:
    return RunConfig(num_epochs=args.num_epoch, seed=args.seed, checkpoint_dir=run_folder, run_args=run_args,
                     max_batches=4 if args.barely_train else None, amp=args.amp, max_nan_skips=args.max_nan_skips)


def _start_model(args: argparse.Namespace, build, resume: dict, stage: str) -> tuple[torch.nn.Module, dict, dict]:
    """The model of a new run (from --checkpoint-path when given) or of a resumed one (weights come later),
    its shape (architecture, patch and input size) and the split its source checkpoint was trained on."""
    wanted = suggested_checkpoint(args.output_dir, f'backbone_{args.data_set}_*/best.pth',
                                  'a best.pth of the backbone stage' + (' or official GFNet weights'
                                                                        if stage == 'backbone' else ''),
                                  backbone_run_folder(args.output_dir, args.data_set,
                                                      args.arch or model_factory.DEFAULT_ARCH) / 'best.pth')
    start, source_args = checkpoint_args(None if resume else args.checkpoint_path, wanted)
    if stage == 'backbone' and start.get('stage') in DYNN_STAGES:
        raise GFNetDynnError(f'--checkpoint-path {args.checkpoint_path} is a dynn-stage checkpoint (exits and gates); '
                             f'--stage backbone starts from a backbone checkpoint or official GFNet weights: pass '
                             f'the backbone_*/best.pth it was trained from, or continue its run with --resume')
    source_args = RunArgs.of(resume) if resume else source_args
    shape = resolve_model_shape(args, source_args)
    model = build(shape, dataset_num_classes(args.data_set))
    if start:
        report = load_state(model, start, source=args.checkpoint_path)
        if stage == 'dynn':
            _check_head(args, model, start, source_args, report)
    return model, shape, source_args.recorded_split(args.data_set)


def _check_head(args: argparse.Namespace, model: torch.nn.Module, start: dict, source_args: RunArgs,
                report: LoadReport) -> None:
    """The exits train on top of the backbone's final head: a --checkpoint-path whose head was dropped for another
    class count is an error, unless --new-head asks for a fresh one (logged)."""
    prefixes = getattr(model, 'classifier_prefixes', ('head.',))
    dropped = [key for key in report.fresh if key.startswith(prefixes)]
    if not dropped:
        return
    state = start.get('model', start)
    shapes = [state[k].shape[0] for key in dropped[:1] for k in (key, key.removeprefix('backbone.'), f'module.{key}')
              if torch.is_tensor(state.get(k))]
    count = len(source_args.class_names) if source_args.class_names else (shapes[0] if shapes else None)
    classes = dataset_num_classes(args.data_set)
    if args.new_head:
        logging.warning('--new-head: the final classifier starts fresh for the %d classes of %s (the checkpoint\'s '
                        'predicts %s)', classes, args.data_set, count if count is not None else 'none')
        return
    check_class_count(args.checkpoint_path, count, args.data_set, classes,
                      'pass the backbone trained on this data set, or --new-head to train a fresh final head')


def run_backbone(args: argparse.Namespace, flags: FlagFacts, device: torch.device, distributed: bool,
                 resume: dict) -> Path:
    """Stage 0: plain GFNet, optionally distilled, with GFNet's recipe by default."""
    args = with_stage_defaults(args, 'backbone')
    recipe = backbone_recipe(args)
    total_batch = args.batch * (torch.distributed.get_world_size() if distributed else 1)
    step = BackboneStep(build_mixup(recipe, dataset_num_classes(args.data_set), args.batch), args.clip_grad)
    # --pretrained weights go in when the model is built; a resumed run's come from its checkpoint
    pretrained = None if resume else args.pretrained
    model, shape, recorded = _start_model(args, lambda s, classes: model_factory.build_backbone(
        s['arch'], classes, s['input_size'], s['patch_size'], args.drop_path, pretrained), resume, 'backbone')
    run_folder = backbone_run_folder(args.output_dir, args.data_set, shape['arch'])
    if not resume:
        check_new_run([run_folder], args.overwrite, {'--checkpoint-path': args.checkpoint_path,
                                                     '--pretrained': args.pretrained,
                                                     '--teacher-path': args.teacher_path})
    writable_location(Path(args.output_dir), '--output-dir')
    data = build_data(args, shape['input_size'], distributed, recorded)
    split_path = check_split_file(args.output_dir, data.split)
    model.to(device)
    criterion = build_criterion(args, model, len(data.classes), shape, device)
    optimizer = build_backbone_optimizer(model, criterion, recipe, total_batch)
    scheduler = build_backbone_scheduler(optimizer, recipe)
    start = resume_training(resume, model, optimizer, scheduler, args.resume) if resume else FRESH_START
    if resume:
        criterion.load_learned_state_dict(start.state['criterion'])
    run = run_config(args, run_folder, run_args_dict(args, flags, shape, data, split_path))
    train_model = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
    with removed_on_bad_input([run_folder, split_path, Path(args.output_dir) / 'runs']), \
            claim_run([run_folder], args.overwrite and not resume):
        save_split(split_path, data.split)
        writer = make_writer(Path(args.output_dir), f"backbone_{args.data_set}_{shape['arch']}")
        summary = run_backbone_stage(train_model, criterion, data.train_loader, data.val_loader, optimizer,
                                     scheduler, device, run, writer, start, step)
    if is_main_process():
        print(f'backbone stage done: best val acc {summary.best_acc:.2f}%; checkpoint: {summary.best_path}')
    return summary.best_path


def run_dynn(args: argparse.Namespace, flags: FlagFacts, device: torch.device, distributed: bool,
             resume: dict) -> Path:
    """Stages 1-2: warm-up of the exits, then joint training with the cost trade-off."""
    args = with_stage_defaults(args, 'dynn')
    model, shape, recorded = _start_model(args, lambda s, classes: model_factory.build_dynn(
        s['arch'], classes, s['input_size'], s['patch_size'], args.drop_path, args.exit_positions, args.gate,
        ExitHeadConfig(args.exit_head, args.exit_norm, args.exit_grid)), resume, 'dynn')
    if EXIT_COSTS[args.exit_costs].gfnet_only and not model_factory.is_gfnet(shape['arch']):
        # a vector that exists for GFNet only (an explicit choice of it is refused earlier)
        logging.info("exit costs: %s trains against its true FLOPs (--exit-costs %s is GFNet's)", shape['arch'],
                     args.exit_costs)
        args = argparse.Namespace(**{**vars(args), 'exit_costs': DEFAULT_EXIT_COSTS})
    shape = {**shape, 'exit_positions': list(model.exit_positions)}  # the architecture's default made explicit
    if not resume and not args.checkpoint_path:
        logging.warning('no --checkpoint-path: training exits on a randomly initialised backbone; train one '
                        'first with --stage backbone')
    run_folder = dynn_run_folder(args.output_dir, args.data_set, args.ce_ic_tradeoff, shape['arch'])
    heads_dir = warmup_folder(args.output_dir, args.data_set, shape['arch'], shape['input_size'],
                              args.max_warmup_epoch, args.ce_ic_tradeoff)
    if not resume:
        check_new_run([run_folder, heads_dir], args.overwrite, {'--checkpoint-path': args.checkpoint_path})
    writable_location(Path(args.output_dir), '--output-dir')
    data = build_data(args, shape['input_size'], distributed, recorded)
    split_path = check_split_file(args.output_dir, data.split)
    model.to(device)
    optimizer, scheduler = dynn_optimizer(model, args.opt, args.wd, lr=args.lr,
                                          transfer_ratio=args.transfer_ratio, gate_lr=args.gate_lr, min_lr=args.min_lr,
                                          num_epochs=args.num_epoch)
    start = resume_training(resume, model, optimizer, scheduler, args.resume) if resume else FRESH_START
    # measured once per run (--exit-costs latency) and recorded, so a resumed run trains against the same vector
    costs = exit_cost_vector(model, args.exit_costs, (resume.get('args') or {}).get('exit_cost_vector'))
    logging.info('exit costs (--exit-costs %s): %s', args.exit_costs, ' '.join(f'{c:.3f}' for c in costs))
    run_args = run_args_dict(args, flags, {**shape, 'exit_cost_vector': costs}, data, split_path)
    run = run_config(args, run_folder, run_args)
    distillation = exit_distillation(args.exit_distill, args.exit_distill_tau)
    warmup = WarmupConfig(min(args.max_warmup_epoch, args.num_epoch), args.patience, heads_dir, distillation)
    joint = JointConfig(args.ce_ic_tradeoff, args.bilevel_batch_count, args.phase_counter, args.gate_objective,
                        args.classifier_loss, args.freeze_backbone, args.final_exit_loss, distillation,
                        args.joint_momentum)
    with removed_on_bad_input([run_folder, heads_dir, split_path, Path(args.output_dir) / 'runs']), \
            claim_run([run_folder, heads_dir], args.overwrite and not resume):
        save_split(split_path, data.split)
        writer = make_writer(Path(args.output_dir), f'dynn_{args.data_set}_{args.ce_ic_tradeoff}')
        summary = train_dynn(model, data.train_loader, data.val_loader, optimizer, scheduler, device, run, warmup,
                             joint, costs, writer, start)
    if is_main_process():
        if summary.best_path is None:
            print(f'dynn stages done: warm-up only; checkpoint: {summary.last_path}')
        else:
            print(f'dynn stages done: best gated val acc {summary.best_acc:.2f}%; checkpoint: {summary.best_path}')
    return summary.best_path or summary.last_path
