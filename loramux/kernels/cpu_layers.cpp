// A decoder layer's element-wise ops for bfloat16 on x86 CPUs with AVX512 (`loramux.engine.layer_ops`).
//
// Semantics: torch's ops of loramux/engine/layer_ops.py, each result rounded to bfloat16 where torch rounds it:
//   rms_norm(x [T, d], w [d], eps)[t] = bf16(w * bf16(x[t] * rsqrt(mean(x[t]^2) + eps)))   (mean in float32)
//   rotate(x [T, H, D], cos, sin [T, 1, D])[t, h] = bf16(bf16(x * cos) + bf16(rotate_half(x) * sin)),
//       rotate_half(x) = cat(-x[D/2:], x[:D/2])
//   silu_mul(gate_up [T, 2I])[t] = bf16(bf16(silu(gate)) * up), gate = gate_up[t, :I], up = gate_up[t, I:]
// At decode these tensors are small ([32, 576] for SmolLM2) and each of torch's ops is mostly dispatch: a few
// torch ops become one call. Rows are independent and each is summed in one fixed order, so the thread count
// changes no value.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include "cpu_simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace {

using namespace loramux_simd;

// A call over fewer elements than this runs on the calling thread: at decode sizes waking a second thread
// costs more than the work it would take.
constexpr int64_t kElementsPerTask = 1 << 15;

int64_t rows_per_task(int64_t row_elements) {
  return std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(1, row_elements));
}

// v rounded to bfloat16 and widened back: torch rounds every op's result before the next op reads it.
inline __m512 round_to_bf16(__m512 v) {
  return widen((__m256i)_mm512_cvtneps_pbh(v));
}

inline const uint16_t* bf16_data(const at::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>());
}
inline uint16_t* bf16_data(at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); }

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16, "x, weight: bfloat16");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && weight.dim() == 1 && weight.size(0) == x.size(1) &&
              weight.is_contiguous(), "x [T, d] with contiguous rows, weight [d] contiguous");
  const int64_t rows = x.size(0), d = x.size(1), row_stride = x.stride(0);
  at::Tensor out = at::empty({rows, d}, x.options());
  const uint16_t *x_p = bf16_data(x), *w_p = bf16_data(weight);
  uint16_t* out_p = bf16_data(out);
  const float eps32 = static_cast<float>(eps);  // torch adds eps to a float32 tensor in float32
  at::parallel_for(0, rows, rows_per_task(d), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const uint16_t* row = x_p + t * row_stride;
      __m512 squares = _mm512_setzero_ps();  // a bfloat16 value's square is exact in float32: only the sum rounds
      for (int64_t c = 0; c < d; c += 16) {
        const __m512 v = load_as_float(row + c, lane_mask(d - c));
        squares = _mm512_fmadd_ps(v, v, squares);
      }
      // torch's mean is the float32 sum divided by d; its rsqrt is 1 / sqrt, both correctly rounded
      const __m512 r = _mm512_set1_ps(1.0f / std::sqrt(_mm512_reduce_add_ps(squares) / static_cast<float>(d) + eps32));
      for (int64_t c = 0; c < d; c += 16) {
        const __mmask16 mask = lane_mask(d - c);
        const __m512 normed = round_to_bf16(_mm512_mul_ps(load_as_float(row + c, mask), r));
        store_as_bf16(out_p + t * d + c, _mm512_mul_ps(load_as_float(w_p + c, mask), normed), mask);
      }
    }
  });
  return out;
}

at::Tensor rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && cos.scalar_type() == at::kBFloat16 &&
              sin.scalar_type() == at::kBFloat16, "x, cos, sin: bfloat16");
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.size(2) % 2 == 0, "x [T, H, D], D even, with contiguous heads");
  const int64_t rows = x.size(0), heads = x.size(1), d = x.size(2), half = d / 2;
  for (const at::Tensor* table : {&cos, &sin})
    TORCH_CHECK(table->dim() == 3 && table->size(0) == rows && table->size(1) == 1 && table->size(2) == d &&
                table->stride(2) == 1, "cos, sin [T, 1, D] with contiguous rows");
  at::Tensor out = at::empty({rows, heads, d}, x.options());
  const uint16_t *x_p = bf16_data(x), *cos_p = bf16_data(cos), *sin_p = bf16_data(sin);
  uint16_t* out_p = bf16_data(out);
  at::parallel_for(0, rows, rows_per_task(heads * d), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const uint16_t *c = cos_p + t * cos.stride(0), *s = sin_p + t * sin.stride(0);
      for (int64_t h = 0; h < heads; ++h) {
        const uint16_t* in = x_p + t * x.stride(0) + h * x.stride(1);
        uint16_t* o = out_p + (t * heads + h) * d;
        for (int64_t i = 0; i < half; i += 16) {  // columns i of the first half and half + i of the second
          const __mmask16 mask = lane_mask(half - i);
          const __m512 first = load_as_float(in + i, mask), second = load_as_float(in + half + i, mask);
          const __m512 lo = _mm512_sub_ps(round_to_bf16(_mm512_mul_ps(first, load_as_float(c + i, mask))),
                                          round_to_bf16(_mm512_mul_ps(second, load_as_float(s + i, mask))));
          const __m512 hi = _mm512_add_ps(round_to_bf16(_mm512_mul_ps(second, load_as_float(c + half + i, mask))),
                                          round_to_bf16(_mm512_mul_ps(first, load_as_float(s + half + i, mask))));
          store_as_bf16(o + i, lo, mask);
          store_as_bf16(o + half + i, hi, mask);
        }
      }
    }
  });
  return out;
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.scalar_type() == at::kBFloat16, "gate_up: bfloat16");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.stride(1) == 1 && gate_up.size(1) % 2 == 0,
              "gate_up [T, 2I] with contiguous rows");
  const int64_t rows = gate_up.size(0), width = gate_up.size(1) / 2, row_stride = gate_up.stride(0);
  at::Tensor out = at::empty({rows, width}, gate_up.options());
  const uint16_t* in_p = bf16_data(gate_up);
  uint16_t* out_p = bf16_data(out);
  const __m512 one = _mm512_set1_ps(1.0f);
  at::parallel_for(0, rows, rows_per_task(2 * width), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const uint16_t* gate = in_p + t * row_stride;
      const uint16_t* up = gate + width;
      for (int64_t j = 0; j < width; j += 16) {
        const __mmask16 mask = lane_mask(width - j);
        const __m512 g = load_as_float(gate + j, mask);
        // silu(g) = g / (1 + e^-g): with e = e^-|g| that is g / (1 + e) for g >= 0 and g e / (1 + e) for g < 0,
        // where e^-g would overflow
        const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));
        const __mmask16 negative = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ);
        const __m512 silu = _mm512_div_ps(_mm512_mask_mul_ps(g, negative, g, e), _mm512_add_ps(one, e));
        store_as_bf16(out_p + t * width + j, _mm512_mul_ps(round_to_bf16(silu), load_as_float(up + j, mask)), mask);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(loramux_cpu_layers, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rotate(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.impl("rms_norm", c10::DispatchKey::CPU, TORCH_FN(rms_norm));
  m.impl("rotate", c10::DispatchKey::CPU, TORCH_FN(rotate));
  m.impl("silu_mul", c10::DispatchKey::CPU, TORCH_FN(silu_mul));
}
