"""`--dtype auto` picks bfloat16 only where the CPU multiplies it natively."""

from __future__ import annotations

import torch

from loramux.engine.cpu_features import cpu_flags, native_bf16_flag
from loramux.engine.engine import resolve_dtype

CPU = torch.device("cpu")


def test_flags_are_read_from_the_first_processor(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse avx512f avx512_bf16\n\n"
                       "processor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(cpuinfo) == {"fpu", "sse", "avx512f", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == frozenset()  # not Linux: no flags, so float32


def test_native_bf16_needs_avx512_bf16_or_amx():
    assert native_bf16_flag(frozenset({"avx512f", "avx512_bf16"})) == "avx512_bf16"
    assert native_bf16_flag(frozenset({"amx_tile", "amx_bf16"})) == "amx_bf16"
    assert native_bf16_flag(frozenset({"avx2", "avx512f", "avx512_vnni"})) is None


def test_auto_dtype_follows_the_cpu_and_explicit_dtypes_win():
    assert resolve_dtype("auto", CPU, frozenset({"avx512_bf16"}))[0] == torch.bfloat16
    dtype, why = resolve_dtype("auto", CPU, frozenset({"avx2"}))
    assert dtype == torch.float32 and "no native bfloat16" in why
    assert resolve_dtype("float32", CPU, frozenset({"avx512_bf16"}))[0] == torch.float32
    assert resolve_dtype("auto", torch.device("cuda"), frozenset())[0] == torch.bfloat16
