#!/usr/bin/env bash
# GFNet-Dynn recipes. With no argument: the whole pipeline on the built-in DEMO data (what `make demo` runs):
#   backbone (stage 0) -> exit warm-up (stage 1) + joint training (stage 2) -> evaluation.
# Run from anywhere; outputs go under --output-dir (here: the repository root).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
OUT=${OUT:-.}
LAMBDA=${LAMBDA:-0.75}

# A stage whose run folder holds a finished run is skipped, an unfinished one resumed: running the demo twice,
# or again after Ctrl-C, never trains over a model (make clean starts over).
finished() {
    "$PYTHON" -c 'import sys, torch; c = torch.load(sys.argv[1], map_location="cpu", weights_only=True); sys.exit(0 if c["epoch"] + 1 >= c["args"]["num_epoch"] else 1)' "$1"
}

stage() {  # stage RUN_FOLDER FLAGS...
    local folder=$1
    shift
    if [ -f "$folder/last.pth" ]; then
        if finished "$folder/last.pth"; then
            echo "already trained: $folder (make clean to train again)"
        else
            "$PYTHON" main_dynn.py --resume "$folder/last.pth"
        fi
    else
        "$PYTHON" main_dynn.py "$@"
    fi
}

demo() {
    local backbone="$OUT/checkpoint/backbone_DEMO_GFNet-ti-dynn" dynn="$OUT/checkpoint/checkpoint_DEMO_${LAMBDA}_confEE"
    # Stage 0: a GFNet-Ti at 64 px with 8-px patches (8x8 tokens), trained from scratch; a fifth of the
    # training images (192) is held out of every stage for --eval to choose its threshold on: conformal risk
    # control needs at least 99 to certify a 1-point budget. The small-data recipe, not GFNet's transfer defaults
    # (lr scaled to batch/512, 5 warm-up epochs, Mixup/CutMix: made for fine-tuning, they cost a 6-epoch run from
    # scratch its accuracy, docs/RESULTS.md): unscaled lr, AdamW wd 0.05, no clipping or mixing.
    stage "$backbone" --stage backbone --data-set DEMO --arch GFNet-ti-dynn --patch-size 8 \
        --batch 64 --num_epoch 6 --lr 2e-3 --min-lr 1e-5 --warmup-epochs 1 --warmup-lr 1e-3 --lr-base-batch 0 \
        --wd 0.05 --clip-grad 0 --mixup 0 --cutmix 0 --calib-ratio 0.2 --output-dir "$OUT"
    # Stages 1-2: exits after blocks 3 5 7 9, with the small-data recipe (recipes/small_data.yaml: lr 1e-2,
    # the backbone frozen, max-probability exits), shortened on the command line (which wins over the file):
    # 5 warm-up and 4 joint epochs.
    stage "$dynn" --config recipes/small_data.yaml --data-set DEMO --checkpoint-path "$backbone/best.pth" \
        --batch 64 --num_epoch 9 --max_warmup_epoch 5 --ce_ic_tradeoff "$LAMBDA" --output-dir "$OUT"
    # Evaluation: the threshold chosen on the 192 held-out images with conformal risk control at 2 points
    # (expected accuracy loss at most 2 points on new images; at 1 point, 192 images certify only a threshold
    # with no error among them), every operating point, the oracle and the baselines, real early exit at
    # batch 1, results.json and two plots.
    "$PYTHON" main_dynn.py --eval --data-set DEMO --checkpoint-path "$dynn/best.pth" --budget acc-drop=2 \
        --risk-control crc
}

if [ "$#" -eq 0 ] || [ "$1" = demo ]; then
    demo
    exit 0
fi

# ---------------------------------------------------------------------------------------------------
# Real datasets (layout in README.md, "Datasets"). Copy a block, adjust paths, run it. Stage 0 runs GFNet's
# transfer recipe by default (AdamW, lr 1e-4 x batch / 512, 5 warm-up epochs, Mixup/CutMix, clipping at 1). Batches per epoch below are at --batch 64 without --calib-ratio; with the reference's
# --bilevel_batch_count 60 and --phase-counter epoch, a data set under 61 batches an epoch never reaches a
# classifier phase (the exits then train only in the warm-up; the program says so): pass --phase-counter global
# or a --bilevel_batch_count below its batches per epoch.
# ---------------------------------------------------------------------------------------------------
#
# NWPU-RESISC45 (45 classes, 256 px): backbone distilled from a GFNet-B teacher fine-tuned on NWPU.
#   Default protocol 10% training: 3,150 images, 49 batches an epoch: no classifier phase at
#   --bilevel_batch_count 60 (at 20%: 98 batches, batches 60-97 of each epoch are the classifier phase).
#   python main_dynn.py --stage backbone --data-set NWPU --data-path data/NWPU --arch GFNet-xs-dynn \
#       --input-size 256 --batch 64 --num_epoch 300 \
#       --checkpoint-path weights/gfnet-xs.pth \
#       --teacher-model GFNet-b-dynn --teacher-path checkpoint/backbone_NWPU_GFNet-b-dynn/best.pth \
#       --distillation-type soft --distillation-alpha 0.5 --distillation-tau 1.0
#   (weights/gfnet-xs.pth: the official ImageNet GFNet-XS checkpoint; pos_embed and filters are resized)
#   python main_dynn.py --data-set NWPU --data-path data/NWPU \
#       --checkpoint-path checkpoint/backbone_NWPU_GFNet-xs-dynn/best.pth \
#       --batch 64 --num_epoch 200 --ce_ic_tradeoff 0.75 --lr 0.001 --input-size 256
#   python main_dynn.py --eval --data-set NWPU --data-path data/NWPU \
#       --checkpoint-path checkpoint/checkpoint_NWPU_0.75_confEE/best.pth --input-size 256
#
# UCM (21 classes, 256 px), frequency-domain distillation from a GFNet-S teacher. 80% training: 1,680 images,
#   26 batches an epoch: no classifier phase at --bilevel_batch_count 60.
#   python main_dynn.py --stage backbone --data-set UCM --data-path data/UCM --arch GFNet-xs-dynn \
#       --teacher-model GFNet-s-dynn --teacher-path checkpoint/backbone_UCM_GFNet-s-dynn/best.pth \
#       --distillation-type freq --num_epoch 300
#   python main_dynn.py --data-set UCM --data-path data/UCM \
#       --checkpoint-path checkpoint/backbone_UCM_GFNet-xs-dynn/best.pth --num_epoch 100
#   python main_dynn.py --eval --data-set UCM --data-path data/UCM \
#       --checkpoint-path checkpoint/checkpoint_UCM_0.75_confEE/best.pth
#
# AID (30 classes, 600 px by default; 256 px trains 5x faster). Default protocol 20% training: about 2,000
#   images, 31 batches an epoch: no classifier phase at --bilevel_batch_count 60 (at 50%: 78 batches, 60-77 are).
#   python main_dynn.py --stage backbone --data-set AID --data-path data/AID --input-size 256 \
#       --teacher-model resnet50 --teacher-path weights/resnet50_aid.pth --distillation-type hard
#   python main_dynn.py --data-set AID --data-path data/AID --input-size 256 \
#       --checkpoint-path checkpoint/backbone_AID_GFNet-xs-dynn/best.pth --ce_ic_tradeoff 1.0
#
# PatternNet (38 classes, 256 px). 80% training: 24,320 images, 380 batches an epoch: gate and classifier
#   phases alternate every 60 batches (3 classifier phases an epoch).
#   python main_dynn.py --stage backbone --data-set PatternNet --data-path data/PatternNet
#   python main_dynn.py --data-set PatternNet --data-path data/PatternNet \
#       --checkpoint-path checkpoint/backbone_PatternNet_GFNet-xs-dynn/best.pth
#
# NaSC-TG2 (10 classes, 128 px, one folder randomly split 80/20 with --seed; 42 is the reference's split).
#   16,000 training images, 250 batches an epoch: 2 classifier phases an epoch (batches 60-119, 180-239).
#   python main_dynn.py --stage backbone --data-set NaSC --data-path data/NaSC --split-ratio 0.8 --seed 42
#   python main_dynn.py --data-set NaSC --data-path data/NaSC \
#       --checkpoint-path checkpoint/backbone_NaSC_GFNet-xs-dynn/best.pth
#
# Trade-off sweep (higher lambda exits earlier):
#   for l in 0.25 0.5 0.75 1.0 2.0; do
#       python main_dynn.py --data-set UCM --checkpoint-path checkpoint/backbone_UCM_GFNet-xs-dynn/best.pth \
#           --ce_ic_tradeoff $l --num_epoch 50
#   done
#
# Resume an interrupted run (any stage): python main_dynn.py --resume checkpoint/<run>/last.pth
# Several GPUs: torchrun --nproc_per_node 4 main_dynn.py <same flags>
# Edge export:  python main_dynn.py --export onnx --checkpoint-path <best.pth> --data-set DEMO --out export/
echo "usage: $0 [demo]   (the recipes for real datasets are comments in this file)" >&2
exit 2
