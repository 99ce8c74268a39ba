"""Constants the library shares with the torch-free training options (vitok_fast/options.py):
they live here, a module that imports nothing, so that a script's ``--help`` imports no torch
and the library's import graph stays free of cycles."""

# vitok_fast.attention's backends (--attention-backend's choices) and its default
ATTENTION_BACKENDS = ("sdpa", "auto", "flash", "cudnn", "efficient", "math", "fa4")
DEFAULT_ATTENTION_BACKEND = "sdpa"
# vitok_fast.distributed's collective timeout (--dist-timeout's default): a step plus a
# checkpoint save fit in it many times
DEFAULT_DIST_TIMEOUT_S = 600
