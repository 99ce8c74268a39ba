"""The Hugging Face Hub: a Hub id to a local checkpoint folder, and a checkpoint up to the Hub.

A ViTok checkpoint is already what the Hub serves: a folder of ``config.json`` and
``model.safetensors``. ``ViTok.from_pretrained("org/name")`` therefore fetches those two
files with huggingface_hub's ``snapshot_download`` and hands the snapshot folder to the
local loader, so a Hub checkpoint goes through the same strict key and shape checks as a
local one; ``ViTok.push_to_hub`` writes ``save_pretrained``'s folder and uploads it with
``HfApi.upload_folder``.

:class:`HubMixin` gives a model class (ViTok, the DiT) ``save_pretrained``,
``from_pretrained`` and ``push_to_hub``; this module imports no model (only
vitok_fast/pretrained.py, the directory format), so the model imports it, not the reverse.

Why ``snapshot_download`` and not huggingface_hub's ``PyTorchModelHubMixin``:

- the mixin is a base class, so ``ViTok`` would import huggingface_hub whenever
  ``vitok_fast`` is imported; here the Hub is an optional extra, imported only when a Hub id
  is given or ``push_to_hub`` is called;
- the mixin rebuilds a model from its ``__init__`` keyword arguments and loads weights
  with its own (non-strict by default) loader; ``config.json`` here holds a
  ``ViTokConfig`` and every load checks every key and shape, with the same error messages
  whatever the source;
- ``snapshot_download`` resolves a branch or tag to one commit and takes both files from
  it (two ``hf_hub_download`` calls would each resolve the branch, which can move between
  them), and in offline mode (``HF_HUB_OFFLINE=1``, or no network) it reads the same
  commit from the cache (``refs/<revision>`` -> ``snapshots/<commit>/``).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from vitok_fast.pretrained import CONFIG_FILE, WEIGHTS_FILE, load_model_dir, save_model_dir

# A Hub model id "namespace/name": letters, digits, "-", "_", "."; neither part starts or
# ends with "-" or "."; no "--" or ".." (huggingface_hub's rules). The namespace is
# required here so that a mistyped relative path like "ckpt" is not sent to the Hub.
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"^(?!.*(?:--|\.\.)){_PART}/{_PART}$")

INSTALL = "pip install 'vitok_fast[hub]' (or pip install huggingface_hub)"


def is_repo_id(name: str | os.PathLike) -> bool:
    """True if ``name`` has the form of a Hub model id ``namespace/name``."""
    return isinstance(name, str) and _REPO_ID.match(name) is not None


def resolve_checkpoint(name_or_path: str | os.PathLike, revision: str | None = None,
                       cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding ``config.json`` and ``model.safetensors`` for ``name_or_path``.

    An existing path is used as it is. Otherwise a ``namespace/name`` id is looked up on the
    Hub at ``revision`` (a branch, tag or commit; default "main"), downloading into
    ``cache_dir`` (default: huggingface_hub's, ``HF_HUB_CACHE``) what is not cached yet; with
    ``HF_HUB_OFFLINE=1`` or no network only the cache is read. Anything else is returned as a
    path, for the loader to report as missing.
    """
    path = Path(name_or_path)
    if path.exists() or not is_repo_id(name_or_path):
        if revision is not None:
            raise ValueError(
                f"revision={revision!r} selects a commit of a Hub repo, but {str(path)!r} is a "
                f"local path; drop revision, or pass a Hub id 'namespace/name'")
        return path
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import (LocalEntryNotFoundError, RepositoryNotFoundError,
                                           RevisionNotFoundError)
    except ImportError:
        raise ImportError(
            f"{name_or_path!r} is not a local folder, and loading it as a Hub id needs "
            f"huggingface_hub: {INSTALL}") from None
    where = f"Hub repo {name_or_path!r} at revision {revision or 'main'!r}"
    try:
        folder = snapshot_download(name_or_path, revision=revision, cache_dir=cache_dir,
                                   allow_patterns=[CONFIG_FILE, WEIGHTS_FILE])
    except RevisionNotFoundError:
        raise FileNotFoundError(
            f"{where}: the repo exists but has no such branch, tag or commit") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"no local folder {str(path)!r}, and no {where} (it does not exist, or it is "
            f"private or gated: log in with `hf auth login`)") from None
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(
            f"no local folder {str(path)!r}, and the {where} is not in the cache "
            f"({cache_dir or 'HF_HUB_CACHE'}) while the Hub cannot be reached (HF_HUB_OFFLINE=1 "
            f"or no network): download it once online, or pass a local folder. "
            f"huggingface_hub says: {str(e).splitlines()[0]}") from None
    return Path(folder)


def push_to_hub(model, repo_id: str, *, private: bool | None = None, token: str | None = None,
                revision: str | None = None, commit_message: str | None = None,
                create_pr: bool = False):
    """Upload ``model``'s ``config.json`` and ``model.safetensors`` to the Hub repo ``repo_id``
    (created if missing) in one commit; returns huggingface_hub's ``CommitInfo``. The commit
    message defaults to "Upload <class name>"."""
    if not is_repo_id(repo_id):
        raise ValueError(f"repo_id must be a Hub id 'namespace/name', got {repo_id!r}")
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise ImportError(f"push_to_hub needs huggingface_hub: {INSTALL}") from None
    if commit_message is None:
        commit_message = f"Upload {type(model).__name__}"
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message,
                                 revision=revision, create_pr=create_pr)


class HubMixin:
    """``save_pretrained``, ``from_pretrained`` (a local folder or a Hub id) and
    ``push_to_hub`` for a model class with ``cls(config)`` and ``self.config.to_json()``.

    A subclass sets ``config_class`` (built by ``config_class.from_dict`` on load) and
    ``config_tag`` (the config's key in the weights' metadata).
    """

    config_class: type
    config_tag: str

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``config.json`` and ``model.safetensors``, each atomically."""
        save_model_dir(self, directory, self.config_tag)

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    revision: str | None = None, commit_message: str | None = None,
                    create_pr: bool = False):
        """Upload ``config.json`` and ``model.safetensors`` to the Hub repo ``repo_id`` (created
        if missing) in one commit, through huggingface_hub's upload API (:func:`push_to_hub`)."""
        return push_to_hub(self, repo_id, private=private, token=token, revision=revision,
                           commit_message=commit_message, create_pr=create_pr)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None, torch_dtype=None, device=None,
                        **overrides):
        """Load a model saved by :meth:`save_pretrained`, with strict key and shape checks.

        ``name_or_path`` is a local folder or a Hub id ``namespace/name``; a Hub id is
        fetched at ``revision`` (branch, tag or commit) into ``cache_dir`` by huggingface_hub,
        or read from that cache when offline (:func:`resolve_checkpoint`). ``torch_dtype``
        casts the weights (e.g. ``torch.bfloat16``); ``device`` defaults to the CPU.
        ``overrides`` set run-time config fields such as ``use_kernels``.
        """
        import torch

        if torch_dtype is not None and not (isinstance(torch_dtype, torch.dtype)
                                            and torch_dtype.is_floating_point):
            raise ValueError(f"torch_dtype must be a floating-point torch.dtype such as "
                             f"torch.bfloat16, got {torch_dtype!r}")
        directory = resolve_checkpoint(name_or_path, revision, cache_dir)
        return load_model_dir(cls, cls.config_class, directory, cls.__name__, device=device,
                               torch_dtype=torch_dtype, overrides=overrides)
