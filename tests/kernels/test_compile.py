"""Kernels compiled for an H100 (sm_90) on the CPU, no GPU needed: Triton's interpreter, which
runs the other kernel tests here, accepts code that the compiler refuses (a plain global read, a
shape or type the GPU backend does not take), so the kernels no GPU test has run yet are compiled
here for the card they are meant for."""

import pytest

triton = pytest.importorskip("triton")


def _compile(fn, signature: dict, constexprs: dict, num_warps: int = 4):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {**signature, **{name: "constexpr" for name in constexprs}}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    try:
        return triton.compile(
            src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}
        )
    except (ImportError, RuntimeError, FileNotFoundError) as e:  # no CUDA backend in this triton
        if "ptxas" in str(e) or "backend" in str(e).lower():
            pytest.skip(f"this triton cannot compile for CUDA here: {e}")
        raise


def _cases():
    from commvq.kernels import decode, select, window

    ints = lambda *names: {n: "i32" for n in names}  # noqa: E731
    mix = {
        "part_ptr": "*fp32",
        "table_ptr": "*fp32",
        "out_ptr": "*fp32",
        **ints("S", "HQP", "NBITS", "HKV"),
    }
    yield "mix", decode._mix_kernel, mix, dict(G=4, GP=4, D=128, DP=128, BK=16, SB=16), 4
    yield "mix, odd shapes", decode._mix_kernel, mix, dict(G=3, GP=4, D=48, DP=64, BK=16, SB=16), 4
    for has_src in (True, False):
        row = {
            "x_ptr": "*fp32",
            "src_ptr": "*i64" if has_src else "*fp32",
            "out_ptr": "*i64",
            **ints("N", "K"),
        }
        yield (
            f"select row, source {has_src}",
            select._row_kernel,
            row,
            dict(HAS_SRC=has_src, B=8, NP=4096),
            8,
        )
    strides = ints("stride_b", "stride_h", "stride_t")
    for dt in ("bf16", "fp32"):
        sc = {"q_ptr": "*fp32", "k_ptr": f"*{dt}", "len_ptr": "*i64", "s_ptr": "*fp32"}
        sc = {**sc, "best_ptr": "*fp32", **ints("HQ", "HKV", "W"), **strides}
        sc = dict(zip(window._scores_kernel.arg_names, sc.values(), strict=False))
        consts = dict(D=128, WP=256, DK=32, HAS_LEN=True)
        yield f"window scores, {dt}", window._scores_kernel, sc, consts, 4
        mg = {"e_ptr": "*fp32", "s_ptr": "*fp32", "v_ptr": f"*{dt}", "p_ptr": "*fp32"}
        mg = {**mg, "out_ptr": "*fp32", **ints("HQ", "HKV", "K", "W"), **strides}
        mg = dict(zip(window._merge_kernel.arg_names, mg.values(), strict=False))
        yield f"merge, {dt}", window._merge_kernel, mg, dict(D=128, WP=256, KB=1024, DK=32), 4
    hist = {"x_ptr": "*fp32", "hist_ptr": "*i32", **ints("N", "k")}
    for p in range(3):
        yield (
            f"select histogram pass {p}",
            select._hist_kernel,
            hist,
            dict(PASS=p, B=8, CHUNK=4096),
            8,
        )
    count = {"x_ptr": "*fp32", "hist_ptr": "*i32", "cnt_ptr": "*i32", **ints("N", "k", "C")}
    yield "select count", select._count_kernel, count, dict(B=8, CHUNK=4096), 8
    write = {**count, "out_ptr": "*i64"}
    write = {k: write[k] for k in ("x_ptr", "hist_ptr", "cnt_ptr", "out_ptr", "N", "k", "C")}
    yield "select write", select._write_kernel, write, dict(B=8, CHUNK=4096, CP=32), 8


CASES = {case[0]: case[1:] for case in _cases()}


@pytest.mark.parametrize("name", list(CASES))
def test_kernels_compile_for_an_h100(name):
    fn, signature, constexprs, warps = CASES[name]
    kernel = _compile(fn, signature, constexprs, warps)
    assert "cubin" in kernel.asm, name
