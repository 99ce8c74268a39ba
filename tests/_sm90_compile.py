"""Compile every Triton kernel for sm_90 ahead of time; run by tests/test_kernels_compile.py
in a subprocess *without* TRITON_INTERPRET (under the interpreter @triton.jit gives
interpreted functions, which cannot be compiled). Prints one line per kernel."""

import importlib
import inspect
import itertools
import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

import triton  # noqa: E402

try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:
    raise SystemExit("SKIP this Triton has no ahead-of-time compile API")

HOPPER = GPUTarget("cuda", 90, 32)


def _module(name):
    return importlib.import_module(f"vitok_fast.kernels.{name}")


def _compile(fn, types: dict, constexprs: dict, **options):
    signature = {**types, **{k: "constexpr" for k in constexprs}}
    # As a real launch on 16-byte-aligned tensors with ViTok's sizes would specialise them:
    # every pointer, stride and size divisible by 16 (lets Triton vectorise loads).
    names = list(inspect.signature(fn.fn).parameters)
    aligned = {(names.index(n),): [["tt.divisibility", 16]] for n, t in types.items()
               if t.startswith("*") or (t == "i32" and n not in ("programs", "iters"))}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=aligned)
    try:
        kernel = triton.compile(src, target=HOPPER, options=options)
    except RuntimeError as e:  # no ptxas / CUDA backend in this Triton build
        if "ptxas" in str(e) or "backend" in str(e).lower():
            raise SystemExit(f"SKIP no CUDA compiler toolchain in this Triton: {e}")
        raise
    ptx = kernel.asm["ptx"]
    assert ".target sm_90" in ptx and kernel.asm["cubin"]
    return ptx


def _ints(*names, kind="i32"):
    return {n: kind for n in names}


def check_rms_norm_kernels_compile_for_sm90(residual, block_m, block_n, warps):
    m = _module("rms_norm")
    types = {"X": "*bf16", "R": "*bf16", "W": "*fp32", "Y": "*bf16", "S": "*bf16", "RSTD": "*fp32",
             **_ints("M", "N", "stride_x", "stride_r", "stride_y", "stride_s"), "eps": "fp32"}
    _compile(m._rms_norm_fwd, types, dict(HAS_RESIDUAL=residual, BLOCK_M=block_m, BLOCK_N=block_n),
             num_warps=warps)
    types = {"DY": "*bf16", "X": "*bf16", "W": "*fp32", "RSTD": "*fp32", "DS": "*bf16", "DX": "*bf16",
             "DW_PARTIAL": "*fp32", **_ints("M", "N", "stride_dy", "stride_x", "stride_ds", "stride_dx"),
             "programs": "i32", "iters": "i32"}
    _compile(m._rms_norm_bwd, types, dict(HAS_DSUM=residual, BLOCK_M=block_m, BLOCK_N=block_n),
             num_warps=warps)


def check_swiglu_kernels_compile_for_sm90():
    m = _module("swiglu")
    types = {"G": "*bf16", "U": "*bf16", "Y": "*bf16", **_ints("M", "H", "stride_g", "stride_u", "stride_y")}
    _compile(m._swiglu_fwd, types, dict(BLOCK_M=4, BLOCK_H=1024), num_warps=4)
    types = {"DY": "*bf16", "G": "*bf16", "U": "*bf16", "DG": "*bf16", "DU": "*bf16",
             **_ints("M", "H", "stride_dy", "stride_g", "stride_u", "stride_dg", "stride_du")}
    _compile(m._swiglu_bwd, types, dict(BLOCK_M=4, BLOCK_H=1024), num_warps=4)


def check_rope_kernel_compiles_for_sm90(block_r, block_p):
    m = _module("rope")
    types = {"Q": "*bf16", "K": "*bf16", "QO": "*bf16", "KO": "*bf16", "COS": "*fp32", "SIN": "*fp32",
             **_ints("R", "H", "N", "P", "sqb", "sqh", "sqn", "skb", "skh", "skn", "sob", "soh", "son")}
    _compile(m._rope_qk, types, dict(BLOCK_R=block_r, BLOCK_P=block_p), num_warps=4)


# The operands of each product as the wrappers pass them: which one is the pixel tensor
# (gathered / scattered) and which strides are 1 (specialised to constants by a launch).
GEMMS = {
    "embed forward": dict(gather="A", unit=("sb0", "sc1")),     # pixels @ W^T -> out
    "embed dW": dict(gather="B", unit=("sa0", "sc1")),          # dy^T @ pixels -> dW
    "unembed forward": dict(gather="C", unit=("sa1", "sb0")),   # h @ W^T -> pixels
    "unembed dh": dict(gather="A", unit=("sb1", "sc1")),        # dpixels @ W -> dh
    "unembed dW": dict(gather="A", unit=("sb1", "sc1")),        # dpixels^T @ h -> dW
}


def check_tubelet_gemm_compiles_for_sm90(what, dtype, out_dtype=None):
    """``out_dtype`` fp32: the weight gradients' split-K partial slabs."""
    m = _module("tubelet")
    spec = GEMMS[what]
    types = {"BIAS": f"*{dtype}", **_ints("M", "N", "K", "K_CHUNK", "sc_split")}
    constexprs = dict(A_GATHER=spec["gather"] == "A", B_GATHER=spec["gather"] == "B",
                      C_SCATTER=spec["gather"] == "C", HAS_BIAS=True, UPCAST=False,
                      IEEE=dtype == "fp32", BLOCK_M=128, BLOCK_N=128,
                      BLOCK_K=32 if dtype == "fp32" else 64)
    for name in "ABC":
        ptr = out_dtype if name == "C" and out_dtype else dtype
        types.update({name: f"*{ptr}", f"{name}_ROW": "*i64", f"{name}_COL": "*i64"})
        for stride in (f"s{name.lower()}0", f"s{name.lower()}1"):
            if stride in spec["unit"]:
                constexprs[stride] = 1
            else:
                types[stride] = "i32"
    ptx = _compile(m._offset_gemm, types, constexprs, num_warps=8, num_stages=3)
    if dtype == "bf16":
        assert "wgmma" in ptx, f"{what}: expected Hopper tensor-core MMAs (wgmma)"
    return ptx


if __name__ == "__main__":
    checks = [
        *[(check_rms_norm_kernels_compile_for_sm90, args) for args in itertools.product(
            (False, True), ((4, 1024, 4), (1, 8192, 8)))],
        (check_swiglu_kernels_compile_for_sm90, ()),
        *[(check_rope_kernel_compiles_for_sm90, args) for args in ((64, 32), (32, 64))],
        *[(check_tubelet_gemm_compiles_for_sm90, (what, "bf16")) for what in GEMMS],
        (check_tubelet_gemm_compiles_for_sm90, ("embed forward", "fp32")),
        *[(check_tubelet_gemm_compiles_for_sm90, (what, "bf16", "fp32"))
          for what in ("embed dW", "unembed dW")],
    ]
    for fn, args in checks:
        if fn is check_rms_norm_kernels_compile_for_sm90:
            residual, (bm, bn, w) = args
            fn(residual, bm, bn, w)
        else:
            fn(*args)
        print("OK", fn.__name__, args, flush=True)
