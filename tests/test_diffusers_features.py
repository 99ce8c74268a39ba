"""AutoencoderViTok as a diffusers model: what diffusers' own generic model tests check
(ModelTesterMixin, MemoryTesterMixin = CPU/disk offload + group offload + layerwise casting,
TrainingTesterMixin, TorchCompileTesterMixin, autoencoders' slicing/tiling mixin), written
for ViTok, plus a real DiTPipeline with it as the VAE.

The checks run on the CPU where their substance needs no GPU: offloading to *disk* stands in
for offloading to the CPU, since a weight that a hook fails to fetch is then garbage (an empty
tensor), not a correct weight that happens to sit on the right device. Streams, CUDA peak
memory, GPU/CPU splits and inductor compiles are ``gpu`` tests. docs/interop.md maps each
diffusers feature to its test here, and names the checks that do not apply to ViTok.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from vitok_fast import ViTok, ViTokConfig
from vitok_fast.model import Block

diffusers = pytest.importorskip("diffusers")
from vitok_fast.diffusers import AutoencoderViTok  # noqa: E402

CONFIG = ViTokConfig.from_name("T-T/8", use_kernels=False)
SAMPLE_SIZE = 24  # smaller than the 32x32 inputs, so that the default tile really tiles


def init_dict(**overrides):
    fields = CONFIG.to_dict()
    fields["latent_channels"] = fields.pop("channels")
    return {**fields, "sample_size": SAMPLE_SIZE, **overrides}


def make_vae(seed=0, **overrides):
    """A tiny AutoencoderViTok built as diffusers' tests build models, from its init dict; the
    weights perturbed so that norms and biases are not at their init values."""
    torch.manual_seed(seed)
    vae = AutoencoderViTok(**init_dict(**overrides))
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return vae.eval()


def pixels(batch=4, size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g) * 2 - 1


@pytest.fixture
def base():
    """The plain model and its outputs on (4, 3, 32, 32): forward, the posterior mean, decode."""
    vae, x = make_vae(), pixels()
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
        return vae, x, {"forward": vae(x).sample, "encode": z, "decode": vae.decode(z).sample}


def outputs(vae, x, z):
    """forward, encode and decode, each called directly, as pipelines do."""
    with torch.no_grad():
        return {"forward": vae(x).sample, "encode": vae.encode(x).latent_dist.mean,
                "decode": vae.decode(z).sample}


def assert_all_equal(got, want):
    for key in want:
        assert torch.equal(got[key], want[key]), f"{key} differs"


# -- ModelTesterMixin: save/load, variants, shards, dtypes, determinism, config access ---------

def test_variant_saves_and_loads_only_by_variant(base, tmp_path):
    vae, x, want = base
    vae.save_pretrained(tmp_path, variant="fp16")
    assert (tmp_path / "diffusion_pytorch_model.fp16.safetensors").is_file()
    loaded = AutoencoderViTok.from_pretrained(tmp_path, variant="fp16").eval()
    with torch.no_grad():
        assert torch.equal(loaded(x).sample, want["forward"])
    with pytest.raises(OSError, match="no file named diffusion_pytorch_model.bin"):
        AutoencoderViTok.from_pretrained(tmp_path)


@pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "parallel"])
def test_sharded_checkpoint_loads_the_same_model(base, tmp_path, monkeypatch, parallel):
    from diffusers.utils import constants
    vae, x, want = base
    size = sum(p.numel() * p.element_size() for p in vae.parameters())
    vae.save_pretrained(tmp_path, max_shard_size=f"{int(size * 0.75) // 1024}KB")
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) >= 2 and shards == sorted(set(index["weight_map"].values()))
    monkeypatch.setattr(constants, "HF_ENABLE_PARALLEL_LOADING", parallel)
    loaded = AutoencoderViTok.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x).sample, want["forward"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_reload_in_a_dtype_through_torch_dtype_and_its_alias(tmp_path, dtype):
    vae = make_vae().to(dtype)
    vae.save_pretrained(tmp_path)
    for kwargs in ({"torch_dtype": dtype, "low_cpu_mem_usage": True},
                   {"torch_dtype": dtype, "low_cpu_mem_usage": False}, {"dtype": dtype}):
        loaded = AutoencoderViTok.from_pretrained(tmp_path, **kwargs)
        assert loaded.dtype == dtype and {p.dtype for p in loaded.parameters()} == {dtype}
        assert all(torch.equal(p, q) for p, q in zip(loaded.parameters(), vae.parameters()))


def test_forward_is_deterministic(base):
    vae, x, want = base
    with torch.no_grad():
        assert torch.equal(vae(x).sample, want["forward"])
    assert want["forward"].shape == x.shape


def test_config_attributes_warn_and_missing_attributes_raise():
    vae = make_vae()
    vae.dummy_attribute = 5
    assert vae.dummy_attribute == 5
    with pytest.warns(FutureWarning):  # config values are read through vae.config
        assert vae.sample_size == SAMPLE_SIZE
    with pytest.raises(AttributeError, match="'AutoencoderViTok' object has no attribute 'does_not_exist'"):
        vae.does_not_exist


# -- autoencoders' mixin: tiling and slicing ----------------------------------------------------

def test_tiling_default_tile_is_the_config_sample_size(base):
    vae, x, want = base
    vae.enable_tiling()
    with torch.no_grad():
        tiled = vae(x).sample
        # the default tile is sample_size (24 px) and the 32 px inputs are cut into tiles
        assert torch.equal(tiled, vae.vitok.decode(vae.vitok.encode(x, tile=SAMPLE_SIZE).mean,
                                                   tile=SAMPLE_SIZE))
        assert (tiled - want["forward"]).abs().max() > 0  # really separate passes...
        assert (tiled - want["forward"]).abs().max() < 0.5  # ...that agree (diffusers' check)
        vae.disable_tiling()
        assert torch.equal(vae(x).sample, want["forward"])
        # a model trained at 32 px runs 32 px inputs whole, tiling on or not
        big = AutoencoderViTok.from_vitok(vae.vitok, sample_size=32)
        big.enable_tiling()
        assert torch.equal(big(x).sample, want["forward"])
    assert AutoencoderViTok.from_vitok(vae.vitok).config.sample_size == 256


def test_tiling_default_follows_a_rectangular_sample_size(base):
    vae, x, _ = base
    wide = AutoencoderViTok.from_vitok(vae.vitok, sample_size=(16, 32))
    assert wide.config.sample_size == [16, 32]
    wide.enable_tiling()
    with torch.no_grad():
        assert torch.equal(wide.encode(x).latent_dist.mean,
                           vae.vitok.encode(x, tile=(16, 32)).mean)


@pytest.mark.parametrize("size", [0, 12, (16, 16, 16), True])
def test_bad_sample_size_says_what_is_expected(size):
    with pytest.raises(ValueError, match=r"sample_size must be an int or \(height, width\), each "
                                         r"a positive multiple of the patch size 8"):
        AutoencoderViTok.from_vitok(ViTok(CONFIG), sample_size=size)


def test_slicing_matches_the_whole_batch(base):
    vae, x, want = base
    assert vae.use_slicing is False
    vae.enable_slicing()
    assert vae.use_slicing is True
    calls = []
    hooks = [part.register_forward_hook(lambda m, args, out: calls.append((type(m).__name__, len(out))))
             for part in (vae.vitok.encoder, vae.vitok.decoder)]
    got = outputs(vae, x, want["encode"])
    for hook in hooks:
        hook.remove()
    # one sample per pass: forward encodes and decodes 4, encode encodes 4, decode decodes 4
    assert sorted(calls) == [("Decoder", 1)] * 8 + [("Encoder", 1)] * 8
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)
    vae.disable_slicing()
    assert_all_equal(outputs(vae, x, want["encode"]), want)


def test_slicing_and_tiling_together(base):
    vae, x, want = base
    vae.enable_tiling()
    with torch.no_grad():
        tiled = vae(x).sample
    vae.enable_slicing()
    with torch.no_grad():
        torch.testing.assert_close(vae(x).sample, tiled, rtol=1e-5, atol=1e-6)


def test_video_model_slices_and_tiles_space():
    model = ViTok(ViTokConfig.from_name("T-T/2x8", use_kernels=False)).eval()
    vae = AutoencoderViTok.from_vitok(model, sample_size=16)
    x = torch.rand(2, 3, 4, 32, 24) * 2 - 1
    with torch.no_grad():
        whole = vae(x).sample
        vae.enable_slicing()
        torch.testing.assert_close(vae(x).sample, whole, rtol=1e-5, atol=1e-6)
        vae.enable_tiling()  # an int sample size tiles space; all 4 frames in each tile
        z = vae.encode(x).latent_dist.mean
        assert torch.equal(z, torch.cat([model.encode(v[None], tile=16).mean for v in x]))
        assert vae.decode(z).sample.shape == x.shape


# -- layerwise casting ----------------------------------------------------------------------

def rounded_reference(vae, storage_dtype):
    """The fp32 model whose Linear weights are rounded to ``storage_dtype`` and back: what
    layerwise casting with fp32 compute must compute exactly (the upcast is exact)."""
    ref = make_vae()
    ref.load_state_dict(vae.state_dict())
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.Linear):
                for p in m.parameters():
                    p.copy_(p.to(storage_dtype).float())
    return ref


def error_bound(vae, storage_dtype) -> float:
    """First-order bound on the output's relative L2 error: each Linear's relative weight
    rounding error eps_i perturbs its output by about eps_i (pre-norm residual blocks keep the
    gain near 1), and independent rounding errors add in quadrature: sqrt(sum eps_i^2)."""
    eps = [((m.weight.to(storage_dtype).float() - m.weight).norm() / m.weight.norm()).item()
           for m in vae.modules() if isinstance(m, torch.nn.Linear)]
    return sum(e * e for e in eps) ** 0.5


@pytest.mark.parametrize("storage", [torch.float16, torch.float8_e4m3fn, torch.float8_e5m2],
                         ids=["fp16", "fp8_e4m3fn", "fp8_e5m2"])
def test_layerwise_casting_equals_rounded_weights_and_stays_near_fp32(base, storage):
    vae, x, want = base
    ref = rounded_reference(vae, storage)
    bound = error_bound(vae, storage)
    cast = make_vae()
    cast.enable_layerwise_casting(storage_dtype=storage, compute_dtype=torch.float32)
    # every Linear is stored cast, the fused tubelet embed and head included; norms are not
    linear = {n for n, m in cast.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {"vitok.encoder.embed", "vitok.decoder.head"} <= linear
    for name, p in cast.named_parameters():
        assert p.dtype == (storage if name.rsplit(".", 1)[0] in linear else torch.float32), name
    assert cast.dtype == torch.float32  # the compute dtype, what inputs must have
    got = outputs(cast, x, want["encode"])
    assert_all_equal(got, outputs(ref, x, want["encode"]))
    for key in want:
        assert torch.isfinite(got[key]).all()
        err = ((got[key] - want[key]).norm() / want[key].norm()).item()
        assert err <= bound, f"{key}: relative error {err:.3g} > bound {bound:.3g}"
    with pytest.raises(TypeError, match=r"expected pixels in the model's dtype torch.float32"):
        cast.encode(x.to(storage if storage == torch.float16 else torch.bfloat16))


def test_layerwise_casting_runs_the_fused_tubelet_kernels(device):
    """use_kernels=True: the embed and head run ops.tubelet_embed / tubelet_unembed (Triton;
    interpreted on the CPU) on the hooks' fp32 copies of their fp16-stored weights."""
    vae = make_vae(use_kernels=True).to(device)
    ref = rounded_reference(vae, torch.float16).to(device)
    vae.enable_layerwise_casting(storage_dtype=torch.float16, compute_dtype=torch.float32)
    seen = []
    originals = {}
    from vitok_fast import ops
    for name in ("tubelet_embed", "tubelet_unembed"):
        originals[name] = getattr(ops, name)

        def spy(*args, _name=name):
            seen.append((_name, args[1].dtype, args[-1]))
            return originals[_name](*args)
        setattr(ops, name, spy)
    try:
        x = pixels(batch=2).to(device)
        with torch.no_grad():
            got = vae(x).sample
    finally:
        for name, fn in originals.items():
            setattr(ops, name, fn)
    assert seen == [("tubelet_embed", torch.float32, True), ("tubelet_unembed", torch.float32, True)]
    with torch.no_grad():
        torch.testing.assert_close(got, ref(x).sample, rtol=1e-4, atol=1e-5)


def test_layerwise_casting_lowers_the_memory_footprint():
    footprint = {}
    for storage in (torch.float32, torch.float16, torch.float8_e4m3fn):
        vae = make_vae()
        vae.enable_layerwise_casting(storage_dtype=storage, compute_dtype=torch.float32)
        footprint[storage] = vae.get_memory_footprint()
    assert footprint[torch.float8_e4m3fn] < footprint[torch.float16] < footprint[torch.float32]


@pytest.mark.parametrize("storage", [torch.float16, torch.float8_e4m3fn, torch.float8_e5m2],
                         ids=["fp16", "fp8_e4m3fn", "fp8_e5m2"])
def test_layerwise_casting_trains(storage):
    vae = make_vae()
    vae.enable_layerwise_casting(storage_dtype=storage, compute_dtype=torch.float32)
    vae.train()
    x = pixels()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vae(x, return_dict=False)[0]
        loss = F.mse_loss(out.float(), torch.randn_like(x))
    loss.backward()
    assert torch.isfinite(loss)
    norms = [p for n, p in vae.named_parameters() if "norm" in n]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in norms)


# -- group offloading (to disk on the CPU; streams are gpu tests) -------------------------------

def expected_groups(offload_type):
    if offload_type == "leaf_level":  # every Linear, and every RMSNorm (owns its weight)
        return sum(isinstance(m, (torch.nn.Linear,)) or type(m).__name__ == "RMSNorm"
                   for m in make_vae().modules())
    # each block, and per Transformer its final norm, per Encoder/Decoder its other layers
    return CONFIG.encoder_depth + CONFIG.decoder_depth + 4


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offload_to_disk_equals_the_plain_model(base, tmp_path, offload_type):
    vae, x, want = base
    offloaded = make_vae()
    kwargs = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
    offloaded.enable_group_offload(torch.device("cpu"), offload_type=offload_type,
                                   offload_to_disk_path=str(tmp_path), **kwargs)
    assert len(list(tmp_path.glob("*.safetensors"))) == expected_groups(offload_type)
    # encode and decode called directly (as pipelines call them), and forward
    assert_all_equal(outputs(offloaded, x, want["encode"]), want)
    offloaded.enable_tiling()
    vae.enable_tiling()
    assert_all_equal(outputs(offloaded, x, want["encode"]), outputs(vae, x, want["encode"]))


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
@pytest.mark.parametrize("disk", [False, True], ids=["memory", "disk"])
def test_group_offload_with_layerwise_casting(base, tmp_path, offload_type, disk):
    """Casting first, so that the offloaded copies (on disk too) are the stored fp16 weights.
    (Offloading to disk first saves the fp32 weights, which each onload then brings back:
    diffusers' behaviour, not ViTok's; the results are then the fp32 model's.)"""
    vae, x, want = base
    ref = make_vae()
    ref.enable_layerwise_casting(storage_dtype=torch.float16, compute_dtype=torch.float32)
    both = make_vae()
    both.enable_layerwise_casting(storage_dtype=torch.float16, compute_dtype=torch.float32)
    kwargs = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
    if disk:
        kwargs["offload_to_disk_path"] = str(tmp_path)
    both.enable_group_offload(torch.device("cpu"), offload_type=offload_type, **kwargs)
    got = outputs(both, x, want["encode"])
    assert_all_equal(got, outputs(ref, x, want["encode"]))
    assert not torch.equal(got["forward"], want["forward"])  # the fp16 weights, not fp32


# -- device_map: CPU and disk offload through accelerate -------------------------------------

@pytest.fixture
def saved(base, tmp_path):
    vae, x, want = base
    vae.save_pretrained(tmp_path / "vae")
    return tmp_path / "vae", x, want


@pytest.mark.parametrize("device_map", ["cpu", "auto"])
def test_device_map_loads(saved, device_map):
    pytest.importorskip("accelerate")
    path, x, want = saved
    vae = AutoencoderViTok.from_pretrained(path, device_map=device_map)
    assert set(vae.hf_device_map.values()) == {"cpu"} or vae.hf_device_map == {"": torch.device("cpu")}
    assert_all_equal(outputs(vae, x, want["encode"]), want)


def test_device_map_offloads_to_disk_and_matches(saved, tmp_path):
    from accelerate.utils.modeling import compute_module_sizes
    path, x, want = saved
    size = compute_module_sizes(make_vae())[""]
    vae = AutoencoderViTok.from_pretrained(path, device_map="auto", max_memory={"cpu": size // 2},
                                           offload_folder=str(tmp_path / "offload"))
    placed = vae.hf_device_map
    assert set(placed.values()) == {"cpu", "disk"}
    assert not any(k.startswith("vitok.encoder.transformer.blocks.0.") for k in placed)  # unsplit
    assert_all_equal(outputs(vae, x, want["encode"]), want)


def test_device_map_disk_offload_without_safetensors_needs_a_folder(base, tmp_path):
    pytest.importorskip("accelerate")
    vae, x, want = base
    vae.save_pretrained(tmp_path, safe_serialization=False)
    size = sum(p.numel() * p.element_size() for p in vae.parameters())
    with pytest.raises(ValueError, match="offload"):
        AutoencoderViTok.from_pretrained(tmp_path, device_map="auto", max_memory={"cpu": size // 10})
    loaded = AutoencoderViTok.from_pretrained(tmp_path, device_map="auto", max_memory={"cpu": size // 10},
                                              offload_folder=str(tmp_path / "off"))
    assert "disk" in set(loaded.hf_device_map.values())
    assert_all_equal(outputs(loaded, x, want["encode"]), want)


# -- training: backward, EMA, gradient checkpointing, mixed precision ------------------------

def loss_and_grads(vae, x, target):
    vae.zero_grad()
    loss = (vae(x, return_dict=False)[0] - target).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in vae.named_parameters()}


def test_training_step_with_ema():
    from diffusers.training_utils import EMAModel
    vae = make_vae().train()
    ema = EMAModel(vae.parameters())
    before = [p.detach().clone() for p in ema.shadow_params]
    x = pixels()
    loss = F.mse_loss(vae(x, return_dict=False)[0], torch.randn_like(x))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in vae.parameters())
    with torch.no_grad():
        for p in vae.parameters():
            p.sub_(0.1 * p.grad)
    ema.step(vae.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, ema.shadow_params))


def test_gradient_checkpointing_switch_drives_vitoks():
    vae = make_vae()
    assert AutoencoderViTok._supports_gradient_checkpointing and not vae.is_gradient_checkpointing
    vae.enable_gradient_checkpointing()
    assert vae.is_gradient_checkpointing
    assert vae.vitok.encoder.transformer.grad_checkpointing and vae.vitok.decoder.transformer.grad_checkpointing
    vae.disable_gradient_checkpointing()
    assert not vae.is_gradient_checkpointing and not vae.vitok.decoder.transformer.grad_checkpointing
    with pytest.raises(ValueError, match="custom gradient_checkpointing_func is not supported"):
        vae.enable_gradient_checkpointing(gradient_checkpointing_func=torch.utils.checkpoint.checkpoint)


def test_gradient_checkpointing_gives_equal_gradients_and_recomputes():
    plain, ckpt = make_vae().train(), make_vae().train()
    ckpt.enable_gradient_checkpointing()
    x = pixels()
    target = torch.randn_like(x)
    calls = []
    for block in ckpt.modules():  # a pre-hook: the recompute stops early, before post-hooks
        if isinstance(block, Block):
            block.register_forward_pre_hook(lambda m, a: calls.append(1))
    loss_a, grads_a = loss_and_grads(plain, x, target)
    loss_b, grads_b = loss_and_grads(ckpt, x, target)
    blocks = CONFIG.encoder_depth + CONFIG.decoder_depth
    assert len(calls) == 2 * blocks  # each block's forward runs again in backward
    assert (loss_a - loss_b).abs() < 1e-5
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=0, atol=5e-5, msg=name)


def test_mixed_precision_training_on_the_cpu():
    vae = make_vae().train()
    x = pixels()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vae(x, return_dict=False)[0]
        loss = F.mse_loss(out.float(), torch.randn_like(x))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in vae.parameters())


# -- torch.compile: regional (the repeated ViTok blocks) and whole-model ----------------------

def test_compile_repeated_blocks_compiles_each_vitok_block(base):
    vae, x, want = base
    assert AutoencoderViTok._repeated_blocks == [Block.__name__]
    torch.compiler.reset()
    vae.compile_repeated_blocks(backend="eager", fullgraph=True)
    compiled = [type(m).__name__ for m in vae.modules() if getattr(m, "_compiled_call_impl", None)]
    assert compiled == ["Block"] * (CONFIG.encoder_depth + CONFIG.decoder_depth)
    # two graphs for all blocks: the first block of each stack gets no residual stream
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=2):
        assert torch.equal(vae(x).sample, want["forward"])
        assert torch.equal(vae(x).sample, want["forward"])
    torch.compiler.reset()


def test_whole_model_compiles_in_one_graph_without_recompiles(base):
    vae, x, want = base
    torch.compiler.reset()
    compiled = torch.compile(vae, fullgraph=True, backend="eager")
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        assert torch.equal(compiled(x).sample, want["forward"])
        assert torch.equal(compiled(x).sample, want["forward"])
    torch.compiler.reset()


def test_one_dynamic_compile_serves_several_sizes():
    vae = make_vae()
    torch.compiler.reset()
    compiled = torch.compile(vae, fullgraph=True, dynamic=True, backend="eager")
    with torch.no_grad(), torch.fx.experimental._config.patch(use_duck_shape=False):
        for height, width in ((32, 32), (32, 48), (48, 64)):
            x = torch.rand(2, 3, height, width) * 2 - 1
            with torch._dynamo.config.patch(error_on_recompile=True):
                assert torch.equal(compiled(x).sample, vae(x).sample)
    torch.compiler.reset()


def test_torch_export_gives_the_same_output(base):
    vae, x, want = base
    exported = torch.export.export(vae, args=(), kwargs={"sample": x})
    with torch.no_grad():
        assert torch.equal(exported.module()(sample=x).sample, want["forward"])


# -- a real pipeline: DiT with AutoencoderViTok as its VAE -----------------------------------

def dit_pipeline(vae):
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel
    torch.manual_seed(0)
    latent = 32 // CONFIG.patch_size
    transformer = DiTTransformer2DModel(
        in_channels=CONFIG.channels, out_channels=2 * CONFIG.channels, sample_size=latent,
        patch_size=2, num_layers=1, num_attention_heads=2, attention_head_dim=8,
        num_embeds_ada_norm=1000, norm_num_groups=4).eval()  # 1000: DiT's null class id
    return DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler(),
                       id2label={0: "zero", 1: "one"})


def test_dit_pipeline_generates_images_with_vae_slicing_and_tiling():
    vae = make_vae()
    vae.enable_slicing()
    vae.enable_tiling()  # 24 px tiles of the 32 px images
    pipe = dit_pipeline(vae)
    seen = []
    vae.vitok.decoder.register_forward_hook(lambda m, args, out: seen.append(tuple(out.shape)))
    images = pipe(class_labels=[0, 1], num_inference_steps=2, guidance_scale=1.0,
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 32, 32, 3) and images.dtype == "float32"
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0
    # slicing: one sample per decode; tiling: 2 x 2 tiles of 24 px each (overlapping by 16)
    assert seen == [(1, 3, 1, 24, 24)] * 8


def test_dit_pipeline_with_model_cpu_offload_matches():
    pytest.importorskip("accelerate")
    run = lambda pipe: pipe(class_labels=[1], num_inference_steps=2, guidance_scale=1.5,  # noqa: E731
                            generator=torch.Generator().manual_seed(3), output_type="np").images
    plain = run(dit_pipeline(make_vae()))
    pipe = dit_pipeline(make_vae())
    pipe.enable_model_cpu_offload(device="cpu")  # the CPU-safe form: accelerate's hooks, no GPU
    assert pipe.vae._hf_hook is not None
    assert torch.equal(torch.from_numpy(run(pipe)), torch.from_numpy(plain))


# -- latent scaling: shift for SD3/FLUX-style pipelines, none for DiT-style ones --------------

def test_shift_false_gives_unit_second_moment_for_pipelines_that_ignore_shift():
    from vitok_fast.latent_stats import Moments, stats_dict
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, CONFIG.channels, 4, 4, generator=g) * 2.0 + 0.75  # off-centre latents
    stats = stats_dict(Moments.of(z), num_samples=64, sample=False, seed=0)
    model = ViTok(CONFIG)
    shifted = AutoencoderViTok.from_vitok(model, stats=stats).config
    plain = AutoencoderViTok.from_vitok(model, stats=stats, shift=False).config
    z = z.double()
    # SD3 / FLUX: (z - shift) * scale has zero mean and unit variance
    z_sd3 = (z - shifted.shift_factor) * shifted.scaling_factor
    assert abs(z_sd3.mean().item()) < 1e-9 and abs(z_sd3.var(unbiased=False).item() - 1) < 1e-9
    # DiT ignores the shift: z * scale. With the shifted stats' scale the second moment is off...
    assert (z * shifted.scaling_factor).pow(2).mean().item() > 1.1
    # ...with shift=False it is 1, and the shift the pipeline would ignore is 0
    assert plain.shift_factor == 0.0
    assert abs((z * plain.scaling_factor).pow(2).mean().item() - 1) < 1e-9
    assert AutoencoderViTok.from_vitok(model, shift=False).config.scaling_factor == 1.0


# -- loading by name: AutoModel with trust_remote_code, and the Hub cache offline ------------

_LOAD_SCRIPT = r"""
import json, sys, torch
from diffusers import AutoModel
from huggingface_hub import snapshot_download
from vitok_fast.diffusers import AutoencoderViTok
folder, repo = sys.argv[1:]
x = torch.rand(2, 3, 32, 32) * 2 - 1
want = AutoencoderViTok.from_pretrained(folder).eval()(x).sample
out = {}
# AutoModel asks the Hub for the commit of a Hub id's remote code even offline (diffusers
# 0.42.1), so offline it takes the cached snapshot's folder
snapshot = snapshot_download(repo, local_files_only=True)
for name, load in (("auto_folder", lambda: AutoModel.from_pretrained(folder, trust_remote_code=True)),
                   ("hub_offline", lambda: AutoencoderViTok.from_pretrained(repo)),
                   ("auto_snapshot_offline", lambda: AutoModel.from_pretrained(snapshot, trust_remote_code=True))):
    vae = load().eval()
    with torch.no_grad():
        out[name] = [type(vae).__name__, torch.equal(vae(x).sample, want)]
print(json.dumps(out))
"""


def test_automodel_and_offline_hub_cache_load_by_name(tmp_path):
    from test_hub import COMMIT_A, REPO, _add_to_cache
    make_vae().save_pretrained(tmp_path / "vae")
    _add_to_cache(tmp_path / "hf_cache", REPO, COMMIT_A, tmp_path / "vae", refs=["main"])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf_cache"),
           "HF_HOME": str(tmp_path / "hf_home"), "HF_MODULES_CACHE": str(tmp_path / "modules")}
    proc = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT, str(tmp_path / "vae"), REPO],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out == {name: ["AutoencoderViTok", True]
                   for name in ("auto_folder", "hub_offline", "auto_snapshot_offline")}


# -- gpu: streams, CUDA memory, GPU/CPU splits, inductor ------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
@pytest.mark.parametrize("record_stream", [False, True])
def test_group_offload_with_streams_on_cuda(offload_type, record_stream):
    x = pixels().cuda()
    want = make_vae().cuda()
    with torch.no_grad():
        z = want.encode(x).latent_dist.mean
    want = outputs(want, x, z)
    vae = make_vae()
    kwargs = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
    vae.enable_group_offload(torch.device("cuda"), offload_type=offload_type, use_stream=True,
                             record_stream=record_stream, **kwargs)
    for _ in range(2):  # the first call records the order that later calls prefetch in
        got = outputs(vae, x, z)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-5)


@pytest.mark.gpu
def test_layerwise_casting_lowers_cuda_peak_memory():
    peaks = {}
    for storage in (torch.float32, torch.float8_e4m3fn):
        vae = make_vae(use_kernels=True).cuda()
        vae.enable_layerwise_casting(storage_dtype=storage, compute_dtype=torch.float32)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            vae(pixels().cuda())
        peaks[storage] = torch.cuda.max_memory_allocated()
    assert peaks[torch.float8_e4m3fn] <= peaks[torch.float32]


@pytest.mark.gpu
def test_device_map_splits_between_gpu_and_cpu(saved):
    from accelerate.utils.modeling import compute_module_sizes
    path, x, want = saved
    size = compute_module_sizes(make_vae())[""]
    vae = AutoencoderViTok.from_pretrained(path, device_map="auto",
                                           max_memory={0: size // 2, "cpu": size * 2})
    assert set(vae.hf_device_map.values()) == {0, "cpu"}
    with torch.no_grad():
        torch.testing.assert_close(vae(x).sample.cpu(), want["forward"], rtol=0, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_reloaded_half_precision_model_infers_the_same(tmp_path, dtype):
    vae = make_vae(use_kernels=True).cuda().to(dtype)
    vae.save_pretrained(tmp_path)
    loaded = AutoencoderViTok.from_pretrained(tmp_path, torch_dtype=dtype).cuda()
    x = pixels().cuda().to(dtype)
    with torch.no_grad():
        assert torch.equal(loaded(x).sample, vae(x).sample)


@pytest.mark.gpu
def test_compile_repeated_blocks_with_inductor_and_kernels():
    vae = make_vae(use_kernels=True).cuda()
    x = pixels().cuda()
    with torch.no_grad():
        want = vae(x).sample
    torch.compiler.reset()
    vae.compile_repeated_blocks(fullgraph=True)
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=2):
        for _ in range(2):
            torch.testing.assert_close(vae(x).sample, want, rtol=1e-4, atol=1e-4)
    torch.compiler.reset()


@pytest.mark.gpu
def test_compile_with_group_offloading_on_cuda():
    vae = make_vae(use_kernels=True)
    x = pixels().cuda()
    vae.enable_group_offload(torch.device("cuda"), offload_type="block_level",
                             num_blocks_per_group=1, use_stream=True, non_blocking=True)
    vae.compile()
    with torch.no_grad():
        first, second = vae(x).sample, vae(x).sample
    with torch.no_grad():
        want = make_vae(use_kernels=True).cuda()(x).sample
    assert torch.isfinite(first).all()
    torch.testing.assert_close(first, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(second, want, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_dit_pipeline_with_model_cpu_offload_on_cuda():
    pipe = dit_pipeline(make_vae(use_kernels=True))
    pipe.enable_model_cpu_offload()
    images = pipe(class_labels=[0, 1], num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 32, 32, 3) and 0 <= images.min() and images.max() <= 1
    assert next(pipe.vae.parameters()).device.type == "cpu"  # offloaded again after use
