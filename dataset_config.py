"""Dataset registry: one entry per dataset. Adding a dataset is adding an entry here.

Keys of each entry:
  num_classes            class count the folders must hold
  default_input_size     used when --input-size is not given
  train_folder           sub-folder of --data-path with the training classes, when the data comes split
  val_folder             sub-folder with the validation classes
  use_random_split       True: one folder split at random over all images, as the reference splits NaSC;
                         False: train/val folders if present, else one folder split per class (stratified)
  default_data_path      used when --data-path is not given (relative to the working directory)
Optional:
  protocol_train_ratios  the training shares papers report for a one-folder download, the first the default
  train_augment          training augmentation settings (scale, ratio, hflip, vflip, aa, color_jitter,
                         train_interpolation, no_aug, reprob) replacing the reference's recipe; flags win
"""

DATASET_CONFIG = {
    'UCM': {
        'num_classes': 21,
        'default_input_size': 256,
        'train_folder': 'train',
        'val_folder': 'val',
        'use_random_split': False,
        'default_data_path': './data/UCM',
        'protocol_train_ratios': [0.8, 0.5],
    },
    'AID': {
        'num_classes': 30,
        'default_input_size': 600,
        'train_folder': 'train',
        'val_folder': 'val',
        'use_random_split': False,
        'default_data_path': './data/AID',
        'protocol_train_ratios': [0.2, 0.5],
    },
    'NWPU': {
        'num_classes': 45,
        'default_input_size': 256,
        'train_folder': 'train',
        'val_folder': 'val',
        'use_random_split': False,
        'default_data_path': './data/NWPU',
        'protocol_train_ratios': [0.1, 0.2],
    },
    'PatternNet': {
        'num_classes': 38,
        'default_input_size': 256,
        'train_folder': 'train',
        'val_folder': 'val',
        'use_random_split': False,
        'default_data_path': './data/PatternNet',
        'protocol_train_ratios': [0.8, 0.5],
    },
    'NaSC': {
        'num_classes': 10,
        'default_input_size': 128,
        'train_folder': '',
        'val_folder': '',
        'use_random_split': True,
        'default_data_path': './data/NaSC',
        'protocol_train_ratios': [0.8],
    },
    # Built-in synthetic scenes (demo_data.py writes them on first use); no download needed.
    'DEMO': {
        'num_classes': 8,
        'default_input_size': 64,
        'train_folder': 'train',
        'val_folder': 'val',
        'use_random_split': False,
        'default_data_path': './data/DEMO',
        # crops of at least half the image: 6 epochs reach 97.5% instead of 96.3% (docs/DATASETS.md)
        'train_augment': {'scale': [0.5, 1.0]},
    },
    # scikit-learn's handwritten digits (demo_data.py writes them on first use): real images, 1797 of them,
    # 8x8 grey upscaled to 32 px RGB, a fixed stratified 75/25 split. Mirrored digits are other symbols, hence
    # no flips; crops keep most of the digit.
    'DIGITS': {
        'num_classes': 10,
        'default_input_size': 32,
        'train_folder': 'train',
        'val_folder': 'val',
        'use_random_split': False,
        'default_data_path': './data/DIGITS',
        'train_augment': {'scale': [0.6, 1.0], 'hflip': 0.0},
    },
}
