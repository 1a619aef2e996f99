// Paged decode attention for bfloat16 on x86 CPUs with AVX512-BF16 (the `cpu` backend of loramux.engine.attention).
//
// Semantics: `paged_attention_decode` of loramux/kernels/attention_ref.py. Sequence b has one query row (its
// last position p = context_lens[b] - 1); query head j reads KV head j / G (G = Hq / Hkv) over the keys
// i in [lo, p], lo = max(0, p - W + 1) with a sliding window W, else 0; key i lives in cache slot
// block_tables[b][i / block_size] * block_size + i % block_size:
//   out[b, j] = sum_i softmax_i(scale * q[b, j] . K[slot(i), j / G]) V[slot(i), j / G]
// Scores, softmax and sums in float32; the softmax weights rounded to bfloat16 before they weigh V (as torch's
// bfloat16 attention rounds them), out rounded to bfloat16 once.
// The cache is read where it lies, through the block table: torch's attention needs the context gathered
// into one tensor first, which at decode moves the whole context twice (gather, then a contiguous copy)
// before reading it. One task per sequence reads its context's K blocks, then its V blocks, in order, once
// each for all its query heads; the tasks write disjoint output rows.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include "cpu_simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

using namespace loramux_simd;

// One sequence's context in the paged cache: keys [lo, hi), key i in row
// table[i / block_size] * block_size + i % block_size of the caches. Each row holds every KV head ([Hkv, D]),
// and a block's rows are contiguous: the passes below walk the context block by block and read whole rows.
struct Context {
  const int32_t* table;
  int64_t lo, hi, block_size;

  int64_t row_of(int64_t i) const { return static_cast<int64_t>(table[i / block_size]) * block_size + i % block_size; }

  // f(first key, keys, first cache row) for each block's run of the context's keys. Before f reads a run of
  // `cache` (rows of row_values values), the next run's rows are prefetched: blocks need not be adjacent, and
  // the hardware prefetcher stops at page boundaries (a block of SmolLM2 is 6 KB). This took about a tenth
  // off a decode step's attention; two runs ahead did no better.
  template <typename F>
  void for_each_run(const uint16_t* cache, int64_t row_values, F&& f) const {
    for (int64_t i = lo; i < hi;) {
      const int64_t count = std::min(block_size - i % block_size, hi - i), next = i + count;
      if (next < hi) {
        const char* p = reinterpret_cast<const char*>(cache + row_of(next) * row_values);
        const int64_t bytes = std::min(block_size, hi - next) * row_values * 2;
        for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
      }
      f(i, count, row_of(i));
      i = next;
    }
  }
};

// The sums of the 16 lanes of each of a, b, c, d, as 4 lanes: one tree of in-register shuffles instead of four
// reductions of 16 lanes each.
inline __m128 sum_lanes4(__m512 a, __m512 b, __m512 c, __m512 d) {
  // 128-bit lanes [a0+a2, a1+a3, b0+b2, b1+b3] and alike for c, d; then [a, b, c, d] as 4 partial sums each
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
  __m512 e = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
  e = _mm512_add_ps(e, _mm512_shuffle_ps(e, e, _MM_SHUFFLE(1, 0, 3, 2)));
  e = _mm512_add_ps(e, _mm512_shuffle_ps(e, e, _MM_SHUFFLE(2, 3, 0, 1)));  // every lane of a 128-bit lane: its sum
  const __m512i firsts = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0);  // lane 0 of each
  return _mm512_castps512_ps128(_mm512_permutexvar_ps(firsts, e));
}

// q . k[u] over d lanes for 4 key rows, in float32: each load of q serves the four.
inline __m128 dot4(const uint16_t* q, const uint16_t* const* k, int64_t d) {
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  for (int64_t c = 0; c < d; c += 32) {
    const __mmask32 mask = tail_mask(d - c);
    const __m512bh qv = as_bh(_mm512_maskz_loadu_epi16(mask, q + c));
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) acc[u] = _mm512_dpbf16_ps(acc[u], as_bh(_mm512_maskz_loadu_epi16(mask, k[u] + c)), qv);
  }
  return sum_lanes4(acc[0], acc[1], acc[2], acc[3]);
}

// sums[0:cols] += sum_i w[i] * v[i * row + 0:cols] over count rows, cols <= 32 * NC, w in bfloat16: vdpbf16ps
// on rows i and i + 1 interleaved column by column (unpacklo / unpackhi of each 128-bit lane), so one
// instruction takes 16 columns of two rows. In float32 lanes, `lo` holds columns 8L + 0..3 and `hi` 8L + 4..7
// of each 128-bit lane L; they are put back in column order once, at the end.
template <int NC>
void weigh_rows(const uint16_t* w, const uint16_t* v, int64_t row, int64_t count, int64_t cols, float* sums) {
  __mmask32 masks[NC];
  __m512 lo[NC], hi[NC];
#pragma GCC unroll 4
  for (int c = 0; c < NC; ++c) {
    masks[c] = tail_mask(cols - 32 * c);
    lo[c] = hi[c] = _mm512_setzero_ps();
  }
  for (int64_t i = 0; i < count; i += 2) {
    const bool pair = i + 1 < count;  // else row i alone, beside a weight of 0
    const uint32_t weights = w[i] | (pair ? static_cast<uint32_t>(w[i + 1]) << 16 : 0u);
    const __m512bh wv = as_bh(_mm512_set1_epi32(static_cast<int>(weights)));
    const uint16_t* first = v + i * row;
    const uint16_t* second = pair ? first + row : first;
#pragma GCC unroll 4
    for (int c = 0; c < NC; ++c) {
      const __m512i a = _mm512_maskz_loadu_epi16(masks[c], first + 32 * c);
      const __m512i b = _mm512_maskz_loadu_epi16(masks[c], second + 32 * c);
      lo[c] = _mm512_dpbf16_ps(lo[c], as_bh(_mm512_unpacklo_epi16(a, b)), wv);
      hi[c] = _mm512_dpbf16_ps(hi[c], as_bh(_mm512_unpackhi_epi16(a, b)), wv);
    }
  }
#pragma GCC unroll 4
  for (int c = 0; c < NC; ++c) {  // 128-bit lanes [lo0, hi0, lo1, hi1] and [lo2, hi2, lo3, hi3]: columns in order
    const __m512 low = _mm512_shuffle_f32x4(lo[c], hi[c], 0x44), high = _mm512_shuffle_f32x4(lo[c], hi[c], 0xEE);
    for (int half = 0; half < 2; ++half) {
      float* out = sums + 32 * c + 16 * half;
      const __mmask16 mask = lane_mask(cols - 32 * c - 16 * half);
      const __m512 part = _mm512_shuffle_f32x4(half ? high : low, half ? high : low, 0xD8);
      _mm512_mask_storeu_ps(out, mask, _mm512_add_ps(_mm512_maskz_loadu_ps(mask, out), part));
    }
  }
}

void weigh_columns(const uint16_t* w, const uint16_t* v, int64_t row, int64_t count, int64_t d, float* sums) {
  for (int64_t c0 = 0; c0 < d; c0 += 128) {  // 4 chunks of 32 columns at a time
    const int64_t cols = std::min<int64_t>(128, d - c0);
    switch ((cols + 31) / 32) {
      case 1: weigh_rows<1>(w, v + c0, row, count, cols, sums + c0); break;
      case 2: weigh_rows<2>(w, v + c0, row, count, cols, sums + c0); break;
      case 3: weigh_rows<3>(w, v + c0, row, count, cols, sums + c0); break;
      default: weigh_rows<4>(w, v + c0, row, count, cols, sums + c0); break;
    }
  }
}

// scores (len values) -> exp(score - max), returning their sum.
float softmax_numerators(float* scores, int64_t len) {
  __m512 top = _mm512_set1_ps(-INFINITY);
  for (int64_t i = 0; i < len; i += 16)
    top = _mm512_max_ps(top, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), lane_mask(len - i), scores + i));
  const __m512 max = _mm512_set1_ps(_mm512_reduce_max_ps(top));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < len; i += 16) {
    const __mmask16 mask = lane_mask(len - i);
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, scores + i), max));
    _mm512_mask_storeu_ps(scores + i, mask, e);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(mask, e));
  }
  return _mm512_reduce_add_ps(sum);
}

// Shapes of one call: Hq query heads, head size d, rows of Hkv * d values; query head j reads the values
// kv_offset[j] = (j / G) * d onwards of a row (G = Hq / Hkv).
struct Heads {
  int64_t num_heads, d, row_values;
  std::vector<int64_t> kv_offset;
};

// One sequence's attention: q, out [Hq, d]; scores and weights buffers of Hq * (hi - lo) values (query head j's
// at j * len); sums a buffer of Hq * d floats.
void attend_sequence(const uint16_t* q, const uint16_t* k_cache, const uint16_t* v_cache, const Context& ctx,
                     const Heads& heads, float scale, float* scores, uint16_t* weights, float* sums, uint16_t* out) {
  const int64_t len = ctx.hi - ctx.lo, d = heads.d;
  const int64_t* kv_offset = heads.kv_offset.data();
  ctx.for_each_run(k_cache, heads.row_values, [&](int64_t first, int64_t count, int64_t row) {
    const uint16_t* k = k_cache + row * heads.row_values;
    for (int64_t i = 0; i < count; i += 4) {  // 4 rows at a time, all heads: the rows are read in order
      const __mmask8 valid = static_cast<__mmask8>(lane_mask(count - i) & 0xF);
      const uint16_t* rows[4];
      for (int u = 0; u < 4; ++u) rows[u] = k + std::min(i + u, count - 1) * heads.row_values;
      for (int64_t j = 0; j < heads.num_heads; ++j) {  // query head j reads KV head j / G
        const uint16_t* keys[4] = {rows[0] + kv_offset[j], rows[1] + kv_offset[j], rows[2] + kv_offset[j],
                                   rows[3] + kv_offset[j]};
        _mm_mask_storeu_ps(scores + j * len + first - ctx.lo + i, valid,
                           _mm_mul_ps(dot4(q + j * d, keys, d), _mm_set1_ps(scale)));
      }
    }
  });
  std::vector<float> totals(heads.num_heads);
  for (int64_t j = 0; j < heads.num_heads; ++j) {
    float* row_scores = scores + j * len;
    totals[j] = softmax_numerators(row_scores, len);
    for (int64_t i = 0; i < len; i += 16)  // bfloat16 weights, as torch's attention rounds them for V
      store_as_bf16(weights + j * len + i, _mm512_maskz_loadu_ps(lane_mask(len - i), row_scores + i),
                    lane_mask(len - i));
  }
  std::fill(sums, sums + heads.num_heads * d, 0.0f);
  ctx.for_each_run(v_cache, heads.row_values, [&](int64_t first, int64_t count, int64_t row) {
    const uint16_t* v = v_cache + row * heads.row_values;  // the run's rows, one block's worth at most: in L1
    for (int64_t j = 0; j < heads.num_heads; ++j)
      weigh_columns(weights + j * len + first - ctx.lo, v + kv_offset[j], heads.row_values, count, d, sums + j * d);
  });
  for (int64_t j = 0; j < heads.num_heads; ++j)
    for (int64_t c = 0; c < d; c += 16) {
      const __mmask16 mask = lane_mask(d - c);
      store_as_bf16(out + j * d + c, _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, sums + j * d + c),
                                                   _mm512_set1_ps(1.0f / totals[j])), mask);
    }
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t block_size,
                            double scale, int64_t sliding_window) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k_cache.scalar_type() == at::kBFloat16 &&
              v_cache.scalar_type() == at::kBFloat16, "q, k_cache, v_cache: bfloat16");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && k_cache.sizes() == v_cache.sizes() &&
              q.size(2) == k_cache.size(2) && q.is_contiguous() && k_cache.is_contiguous() &&
              v_cache.is_contiguous(), "q [B, Hq, D], k_cache and v_cache [num_slots, Hkv, D], contiguous");
  const int64_t batch = q.size(0), num_heads = q.size(1), num_kv_heads = k_cache.size(1), d = q.size(2);
  TORCH_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0, "Hq must be a multiple of Hkv");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt &&
              block_tables.dim() == 2 && block_tables.size(0) == batch && context_lens.dim() == 1 &&
              context_lens.size(0) == batch && block_tables.is_contiguous() && context_lens.is_contiguous(),
              "block_tables [B, max_blocks] and context_lens [B], int32, contiguous");
  TORCH_CHECK(block_size > 0 && k_cache.size(0) % block_size == 0, "the cache holds whole blocks of block_size");
  const int64_t num_blocks = k_cache.size(0) / block_size, max_blocks = block_tables.size(1);
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  for (int64_t b = 0; b < batch; ++b) {  // the blocks a sequence reads must exist: O(B * blocks read)
    TORCH_CHECK(lens[b] >= 1 && lens[b] <= max_blocks * block_size, "context_lens[", b, "] = ", lens[b],
                " is outside [1, max_blocks * block_size]");
    for (int64_t i = 0; i < (lens[b] + block_size - 1) / block_size; ++i)
      TORCH_CHECK(tables[b * max_blocks + i] >= 0 && tables[b * max_blocks + i] < num_blocks, "block_tables[", b,
                  "][", i, "] = ", tables[b * max_blocks + i], " is not a cache block");
  }
  at::Tensor out = at::empty_like(q);
  const auto* q_p = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  const auto* k_p = reinterpret_cast<const uint16_t*>(k_cache.data_ptr<at::BFloat16>());
  const auto* v_p = reinterpret_cast<const uint16_t*>(v_cache.data_ptr<at::BFloat16>());
  auto* out_p = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  Heads heads{num_heads, d, num_kv_heads * d, std::vector<int64_t>(num_heads)};
  for (int64_t j = 0; j < num_heads; ++j) heads.kv_offset[j] = j / (num_heads / num_kv_heads) * d;
  // One task per sequence: it reads its context's blocks whole, once for K and once for V.
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, sums(num_heads * d);
    std::vector<uint16_t> weights;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t hi = lens[b], lo = sliding_window > 0 ? std::max<int64_t>(0, hi - sliding_window) : 0;
      scores.resize(num_heads * (hi - lo));
      weights.resize(num_heads * (hi - lo));
      attend_sequence(q_p + b * num_heads * d, k_p, v_p, Context{tables + b * max_blocks, lo, hi, block_size}, heads,
                      static_cast<float>(scale), scores.data(), weights.data(), sums.data(), out_p + b * num_heads * d);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(loramux_cpu_attention, m) {
  m.def("decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, "
        "int block_size, float scale, int sliding_window) -> Tensor");
  m.impl("decode", c10::DispatchKey::CPU, TORCH_FN(decode_attention));
}
