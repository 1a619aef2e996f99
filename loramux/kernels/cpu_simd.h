// AVX512 helpers shared by the CPU kernels (cpu_bgmv.cpp, cpu_attention.cpp, cpu_layers.cpp): bfloat16 held as
// uint16_t, widened to float32 lanes for sums and rounded back once.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace loramux_simd {

inline __m512bh as_bh(__m512i v) { return (__m512bh)v; }

inline __mmask32 tail_mask(int64_t valid) {  // the first `valid` of 32 bfloat16 lanes (none when valid <= 0)
  return valid >= 32 ? ~__mmask32(0) : valid <= 0 ? __mmask32(0) : (__mmask32(1) << valid) - 1;
}

inline __mmask16 lane_mask(int64_t valid) {  // the first `valid` of 16 float32 lanes (none when valid <= 0)
  return valid >= 16 ? __mmask16(0xFFFF) : valid <= 0 ? __mmask16(0) : __mmask16((1u << valid) - 1);
}

// 16 bfloat16 values widened to float32 lanes (exact: a bfloat16 is a float32's upper half).
inline __m512 widen(__m256i bf16) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16), 16)); }

// `valid` (<= 16) bfloat16 values widened to float32 lanes (0 past them).
inline __m512 load_as_float(const uint16_t* p, __mmask16 valid) { return widen(_mm256_maskz_loadu_epi16(valid, p)); }

// The first `valid` (<= 16) lanes of v rounded to bfloat16 (nearest, ties to even, as torch rounds) and stored.
inline void store_as_bf16(void* p, __m512 v, __mmask16 valid) {
  _mm256_mask_storeu_epi16(p, valid, (__m256i)_mm512_cvtneps_pbh(v));
}

// exp(x) of 16 lanes, x <= 0 (scores minus their maximum, -|x| for silu): 2^n * e^r with |r| <= ln 2 / 2 and a
// degree-6 Taylor polynomial for e^r (relative error below 2e-7).
inline __m512 exp_nonpositive(__m512 x) {
  // e^x underflows to 0 below about -104; max returns its second operand, so NaN stays NaN
  x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);  // ln 2 in two parts keeps r exact
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  for (const float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

inline float as_float(uint16_t bf16) {
  const uint32_t bits = static_cast<uint32_t>(bf16) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

}  // namespace loramux_simd
