"""The training scripts, installed as ``vitok_fast.train`` (``vitok train-stage1``, ``torchrun -m
vitok_fast.train.stage1``) and runnable by path from a clone (``torchrun train/stage1.py``)."""
