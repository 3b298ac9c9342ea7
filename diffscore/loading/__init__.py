"""Model files, opened once: every kind of file a `--ckpt_path` may name becomes one LoadedModel.

Reading a file safely (files.py, edm/pickle.py) is kept apart from building networks out of what was read
(checkpoint.py, edm/network.py); nothing here imports Lightning.
"""
