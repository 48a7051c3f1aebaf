"""Dataset registry: one entry per dataset. Adding a dataset is adding an entry here.

Keys of each entry:
  num_classes         class count the folders must hold
  default_input_size  used when --input-size is not given
  train_folder        sub-folder of --data-path with the training classes (fixed split)
  val_folder          sub-folder with the validation classes (fixed split)
  use_random_split    True: one folder of class sub-folders, split by --split-ratio and --seed
  default_data_path   used when --data-path is not given (relative to the working directory)
"""

DATASET_CONFIG = {
    'UCM': {
        'num_classes': 21,
        'default_input_size': 256,
        'train_folder': 'train',
        'val_folder': 'val',
        'use_random_split': False,
        'default_data_path': './data/UCM',
    },
    'AID': {
        'num_classes': 30,
        'default_input_size': 600,
        'train_folder': 'train',
        'val_folder': 'val',
        'use_random_split': False,
        'default_data_path': './data/AID',
    },
    'NWPU': {
        'num_classes': 45,
        'default_input_size': 256,
        'train_folder': 'train',
        'val_folder': 'val',
        'use_random_split': False,
        'default_data_path': './data/NWPU',
    },
    'PatternNet': {
        'num_classes': 38,
        'default_input_size': 256,
        'train_folder': 'train',
        'val_folder': 'val',
        'use_random_split': False,
        'default_data_path': './data/PatternNet',
    },
    'NaSC': {
        'num_classes': 10,
        'default_input_size': 128,
        'train_folder': '',
        'val_folder': '',
        'use_random_split': True,
        'default_data_path': './data/NaSC',
    },
    # Built-in synthetic scenes (demo_data.py writes them on first use); no download needed.
    'DEMO': {
        'num_classes': 8,
        'default_input_size': 64,
        'train_folder': 'train',
        'val_folder': 'val',
        'use_random_split': False,
        'default_data_path': './data/DEMO',
    },
}
