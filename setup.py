from setuptools import setup

# The Triton kernels live in kernels/ but install as vitok_fast.kernels: a top-level
# `kernels` module would clash with the PyPI package of that name.
CORE = ["torch>=2.4", "triton>=3.0; platform_system == 'Linux'", "einops>=0.7",
        "safetensors>=0.4", "numpy>=1.24"]
EXTRAS = {
    # Stage 1/2 training: LPIPS (VGG), logs and plots, video decoding, the embedded photos.
    # WebDataset-format shards are read with the standard library's tarfile; the
    # `webdataset` package is listed for users' own pipelines over the same shards.
    "train": ["lpips>=0.1.4", "tensorboard>=2.14", "tqdm>=4.66", "webdataset>=0.2.86", "av>=12",
              "scikit-image>=0.22", "matplotlib>=3.8", "Pillow>=10"],
    # Metrics and the evaluate / reconstruct / encode / decode tools.
    "eval": ["torch-fidelity>=0.3", "lpips>=0.1.4", "av>=12", "matplotlib>=3.8", "tqdm>=4.66",
             "scikit-image>=0.22", "Pillow>=10"],
    # bench_e2e.py and profile_step.py also run LPIPS and show progress.
    # generation_digits.py scores DiT samples with a scikit-learn classifier on its digits.
    "bench": ["diffusers>=0.27", "pytest-benchmark>=4.0", "nvtx>=0.2.10", "matplotlib>=3.8",
              "tqdm>=4.66", "lpips>=0.1.4", "scikit-learn>=1.3"],
    # Hub ids in ViTok.from_pretrained and push_to_hub; vitok_fast.diffusers.AutoencoderViTok.
    # Both optional: `import vitok_fast` imports neither.
    "hub": ["huggingface_hub>=0.23"],
    # accelerate: diffusers' group offloading, device_map loads and pipeline CPU offload.
    "diffusers": ["diffusers>=0.27", "huggingface_hub>=0.23", "accelerate>=0.31"],
}
EXTRAS["dev"] = sorted({dep for deps in EXTRAS.values() for dep in deps} | {"pytest>=8"})

setup(
    name="vitok_fast",
    version="0.1.0",
    description="A fast implementation of ViTok, the Vision-Transformer image and video tokenizer",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["vitok_fast", "vitok_fast.kernels"],
    package_dir={"vitok_fast": "vitok_fast", "vitok_fast.kernels": "kernels"},
    install_requires=CORE,
    extras_require=EXTRAS,
    license="MIT",
)
