"""ViTok.from_pretrained with Hub ids (read from a huggingface_hub cache, offline) and
push_to_hub (its upload call intercepted): no test touches the network."""

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from vitok_fast import ViTok
from vitok_fast.hub import is_repo_id
from vitok_fast.model import CONFIG_FILE, WEIGHTS_FILE

hub = pytest.importorskip("huggingface_hub")

REPO = "vitok-org/vitok-t"
COMMIT_A = "a" * 8 + "0123456789abcdef0123456789abcdef"  # 40 hex digits, like a git commit
COMMIT_B = "b" * 8 + "0123456789abcdef0123456789abcdef"


def _model(seed):
    torch.manual_seed(seed)
    model = ViTok.from_name("T-T/8", use_kernels=False).eval()
    with torch.no_grad():  # non-trivial norms too, so that two seeds differ everywhere
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model


def _add_to_cache(cache, repo_id, commit, folder, refs=()):
    """Lay ``folder``'s files out in a huggingface_hub cache as hf_hub_download does: content
    in blobs/<etag> (git blob sha1 for small files, sha256 for LFS files), relative symlinks
    in snapshots/<commit>/, and refs/<branch or tag> holding the commit hash."""
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    (storage / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
    for file in sorted(folder.iterdir()):
        data = file.read_bytes()
        etag = (hashlib.sha256(data).hexdigest() if file.suffix == ".safetensors"
                else hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest())
        (storage / "blobs" / etag).write_bytes(data)
        link = storage / "snapshots" / commit / file.name
        link.symlink_to(os.path.relpath(storage / "blobs" / etag, link.parent))
    for ref in refs:
        (storage / "refs").mkdir(exist_ok=True)
        (storage / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it


@pytest.fixture
def cache(tmp_path):
    """Two commits of one repo: A (tag v1) and B (main, one commit later)."""
    a, b = _model(1), _model(2)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    cache = tmp_path / "hf_cache"
    _add_to_cache(cache, REPO, COMMIT_A, tmp_path / "a", refs=["v1"])
    _add_to_cache(cache, REPO, COMMIT_B, tmp_path / "b", refs=["main"])
    return cache, a, b


def _same_weights(x, y):
    return all(torch.equal(p, q) for p, q in zip(x.state_dict().values(), y.state_dict().values()))


# Run in a fresh interpreter: huggingface_hub reads HF_HUB_OFFLINE and HF_HUB_CACHE once, at
# import, so the environment must be set before it is imported.
_OFFLINE_SCRIPT = r"""
import json, sys, torch
from vitok_fast import ViTok
repo, commit_a, folder_a, folder_b = sys.argv[1:]
a, b = ViTok.from_pretrained(folder_a), ViTok.from_pretrained(folder_b)
def which(model):
    for name, ref in (("a", a), ("b", b)):
        if all(torch.equal(p, q) for p, q in zip(model.state_dict().values(),
                                                 ref.state_dict().values())):
            return name
    return "neither"
out = {rev or "default": which(ViTok.from_pretrained(repo, revision=rev))
       for rev in (None, "main", "v1", commit_a)}
try:
    ViTok.from_pretrained(repo, revision="v2")
except FileNotFoundError as e:
    out["v2 error"] = str(e)
import huggingface_hub.constants as c
out["offline"] = c.HF_HUB_OFFLINE
print(json.dumps(out))
"""


def test_hub_id_loads_each_revision_from_the_cache_with_hf_hub_offline(cache, tmp_path):
    cache_dir, a, b = cache
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache_dir),
           "HF_HOME": str(tmp_path / "hf_home")}
    proc = subprocess.run([sys.executable, "-c", _OFFLINE_SCRIPT, REPO, COMMIT_A,
                           str(tmp_path / "a"), str(tmp_path / "b")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["offline"] is True
    # main (the default) -> commit B; the tag v1 and commit A's hash -> commit A
    assert [out[r] for r in ("default", "main", "v1", COMMIT_A)] == ["b", "b", "a", "a"]
    assert "'v2'" in out["v2 error"] and "not in the cache" in out["v2 error"]


@pytest.fixture
def offline(monkeypatch):
    """In-process offline mode: huggingface_hub asks constants.is_offline_mode() per request."""
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_cache_dir_argument_reads_that_cache(cache, offline):
    cache_dir, a, b = cache
    loaded = ViTok.from_pretrained(REPO, revision=COMMIT_A, cache_dir=cache_dir)
    assert _same_weights(loaded, a) and not _same_weights(loaded, b)
    x = torch.rand(1, 3, 16, 24) * 2 - 1
    assert torch.equal(loaded.encode(x).mean, a.encode(x).mean)


def test_uncached_repo_offline_says_what_to_do(cache, offline):
    cache_dir, _, _ = cache
    with pytest.raises(FileNotFoundError, match=r"Hub repo 'vitok-org/other' at revision 'main' "
                                                r"is not in the cache.*download it once online"):
        ViTok.from_pretrained("vitok-org/other", cache_dir=cache_dir)


def test_snapshot_without_weights_names_the_missing_file(tmp_path, offline):
    _model(1).save_pretrained(tmp_path / "a")
    (tmp_path / "a" / WEIGHTS_FILE).unlink()
    _add_to_cache(tmp_path / "cache", REPO, COMMIT_A, tmp_path / "a", refs=["main"])
    with pytest.raises(FileNotFoundError, match=rf"snapshots/{COMMIT_A}/model\.safetensors.*does not exist"):
        ViTok.from_pretrained(REPO, cache_dir=tmp_path / "cache")


def test_hub_id_without_huggingface_hub_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed
    with pytest.raises(ImportError, match=r"needs huggingface_hub: pip install 'vitok_fast\[hub\]'"):
        ViTok.from_pretrained(REPO)


def test_local_folder_needs_no_huggingface_hub(tmp_path, monkeypatch):
    a = _model(1)
    a.save_pretrained(tmp_path / "a")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    assert _same_weights(ViTok.from_pretrained(tmp_path / "a"), a)
    assert _same_weights(ViTok.from_pretrained(str(tmp_path / "a")), a)


def test_revision_with_a_local_folder_is_an_error(tmp_path):
    _model(1).save_pretrained(tmp_path / "a")
    with pytest.raises(ValueError, match=r"revision='v1' selects a commit of a Hub repo"):
        ViTok.from_pretrained(tmp_path / "a", revision="v1")


@pytest.mark.parametrize("name, expected", [
    ("org/name", True), ("Org-1/vitok_s.b-16", True), ("name", False), ("a/b/c", False),
    ("/abs/path", False), ("./ckpt", False), ("../ckpt", False), ("org/-name", False),
    ("org/na--me", False), ("org/na..me", False), ("runs/s1", True)])
def test_is_repo_id_follows_the_hub_rules(name, expected):
    assert is_repo_id(name) is expected


def test_torch_dtype_casts_the_weights(tmp_path):
    a = _model(1)
    a.save_pretrained(tmp_path / "a")
    loaded = ViTok.from_pretrained(tmp_path / "a", torch_dtype=torch.bfloat16)
    dtypes = {p.dtype for p in loaded.parameters()}
    assert dtypes == {torch.bfloat16}
    assert all(torch.equal(p, q.to(torch.bfloat16))
               for p, q in zip(loaded.state_dict().values(), a.state_dict().values()))
    with pytest.raises(ValueError, match="torch_dtype must be a floating-point torch.dtype"):
        ViTok.from_pretrained(tmp_path / "a", torch_dtype=torch.int8)


def test_push_to_hub_uploads_config_and_weights_in_one_commit(monkeypatch):
    model = _model(3)
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        files = sorted(os.listdir(folder_path))
        config = json.loads(open(os.path.join(folder_path, CONFIG_FILE)).read())
        weights = load_file(os.path.join(folder_path, WEIGHTS_FILE))
        calls.append(("upload_folder", repo_id, kwargs, files, config, weights))
        return "commit-info"

    monkeypatch.setattr(hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(hub.HfApi, "upload_folder", upload_folder)
    result = model.push_to_hub("vitok-org/pushed", private=True, commit_message="first")
    assert result == "commit-info"
    assert [c[:2] for c in calls] == [("create_repo", "vitok-org/pushed"),
                                      ("upload_folder", "vitok-org/pushed")]
    assert calls[0][2]["exist_ok"] is True and calls[0][2]["private"] is True
    _, _, kwargs, files, config, weights = calls[1]
    assert kwargs["commit_message"] == "first"
    assert files == [CONFIG_FILE, WEIGHTS_FILE]
    assert config == model.config.to_dict()
    state = model.state_dict()
    assert sorted(weights) == sorted(state)
    assert all(torch.equal(weights[k], state[k]) for k in state)


def test_push_to_hub_rejects_a_path_as_repo_id():
    with pytest.raises(ValueError, match="repo_id must be a Hub id 'namespace/name'"):
        _model(3).push_to_hub("/tmp/somewhere")


def test_import_vitok_fast_imports_neither_diffusers_nor_huggingface_hub():
    code = ("import sys, vitok_fast, vitok_fast.hub; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('diffusers', 'huggingface_hub')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
