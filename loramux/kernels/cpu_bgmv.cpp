// BGMV LoRA shrink and expand for bfloat16 on x86 CPUs with AVX512-BF16 (`loramux.kernels.cpu_bgmv`).
//
// Semantics (mode "gather" of loramux/kernels/torch_ref.py), for every plan row n, live when slot[n] >= 0
// and slot_active[slot[n]] != 0:
//   shrink: h[n, i*R + r] = coeff[n] * λ_A[n, i*R + r] * A[slot[n]][i*R + r, :] . x[token[n], :]
//           for r in [rank_lo[n], rank_hi[n]) of every fused sub-projection i; 0 elsewhere and on rows that
//           are not live.
//   expand: y[token[n], c] += λ_B[n, c] * B[slot[n]][c, :] . h[n, i*R : (i+1)*R]  for c in sub-projection i's
//           columns.
// λ_A[n] = rank_scale[scale_idx[n]], λ_B[n] = out_scale[scale_idx[n]] (MoR experts); 1 where scale_idx[n] is -1
// or the level has no scale_idx.
// Products and sums in float32 (vdpbf16ps); h rounded to bfloat16 once, y once per token, slot run and
// column tile. Rows read only their own slot's tensors, so the work follows the live rows: a decode step
// streams each used slot's A and B once.
// Consecutive live rows of one slot (for the shrink also of one rank range) are a run (`RowOrder`): a prefill
// segment, a MoR composite's experts. The shrink computes A . x once per distinct token of a run, up to
// kGroup tokens sharing each load of A's lines (a run of kPairedMinTokens or more multiplies its A rows
// transposed as pairs instead, kPairedTokens tokens at a time), and its threads split those groups of tokens.
// The expand transposes each B tile once per run and sums a token's rows of the run (a flat level's repeated
// tokens) in float32 before adding them to y, kInterleaved single-row tokens at a time; its threads split the
// runs where no token has rows in two of them (a decode level), else the column tiles, so no two write one
// element. `apply` is the shrink then the expand in one call.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include "cpu_simd.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

namespace {

using namespace loramux_simd;

constexpr int kTile = 16;  // output columns per expand tile: one float32 vector of sums

inline bool live_row(int64_t slot, const int32_t* slot_active) { return slot >= 0 && slot_active[slot] != 0; }

// Row n's scaling vector in a pool [V + 1, width] (MoR), or nullptr where it has none (scale_idx -1, no pool).
inline const uint16_t* scale_row(const uint16_t* pool, const int64_t* scale_idx, int64_t width, int64_t n) {
  return pool == nullptr || scale_idx[n] < 0 ? nullptr : pool + scale_idx[n] * width;
}

// One row of a slot's A dotted with x_row over d_in, in float32. A row at a time, so that the rows of a rank
// range are read as one sequential stream (rows side by side were short streams the prefetcher barely
// learned: half the bandwidth); x_row stays in L1. Four sums break the dependency chain of vdpbf16ps.
inline float dot_row(const uint16_t* a, int64_t d_in, const uint16_t* x_row) {
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  int64_t k = 0;
  for (; k + 128 <= d_in; k += 128) {
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u)
      acc[u] = _mm512_dpbf16_ps(acc[u], as_bh(_mm512_loadu_si512(a + k + 32 * u)),
                                as_bh(_mm512_loadu_si512(x_row + k + 32 * u)));
  }
  for (; k < d_in; k += 32) {
    const __mmask32 mask = tail_mask(d_in - k);
    acc[0] = _mm512_dpbf16_ps(acc[0], as_bh(_mm512_maskz_loadu_epi16(mask, a + k)),
                              as_bh(_mm512_maskz_loadu_epi16(mask, x_row + k)));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
}

// Up to kGroup distinct tokens of a run are summed together, so each line of A is loaded once for all of
// them (x's rows stay in L1).
constexpr int kGroup = 4;

template <int C>
inline void dot_rows(const uint16_t* a_row, int64_t d_in, const uint16_t* const* x_rows, float* out) {
  __m512 acc[C];
#pragma GCC unroll 4
  for (int j = 0; j < C; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < d_in; k += 32) {
    const __mmask32 mask = tail_mask(d_in - k);
    const __m512bh av = as_bh(_mm512_maskz_loadu_epi16(mask, a_row + k));
#pragma GCC unroll 4
    for (int j = 0; j < C; ++j)
      acc[j] = _mm512_dpbf16_ps(acc[j], av, as_bh(_mm512_maskz_loadu_epi16(mask, x_rows[j] + k)));
  }
#pragma GCC unroll 4
  for (int j = 0; j < C; ++j) out[j] = _mm512_reduce_add_ps(acc[j]);
}

inline void dot_group(const uint16_t* a_row, int64_t d_in, const uint16_t* const* x_rows, int count, float* out) {
  switch (count) {
    case 1: out[0] = dot_row(a_row, d_in, x_rows[0]); return;
    case 2: return dot_rows<2>(a_row, d_in, x_rows, out);
    case 3: return dot_rows<3>(a_row, d_in, x_rows, out);
    default: return dot_rows<4>(a_row, d_in, x_rows, out);
  }
}

// A run of many tokens (a prefill segment) computes its sums as a small GEMM instead, with no horizontal sums:
// the rows of its slot's A that its rank range reads (`columns`: row i*r_max + r for r in [lo, hi) of every
// sub-projection i) are transposed as pairs, a_pairs[p, c] = (A[row c, 2p], A[row c, 2p + 1]), zeros past the
// used columns to a multiple of 16, so one vector holds a pair of inputs for 16 outputs; each token's pair of
// x is broadcast and one vdpbf16ps adds 32 products into 16 sums. kPairedTokens tokens by up to kPairedVectors
// vectors of outputs stay in registers over all of d_in.
constexpr int kPairedTokens = 8;
constexpr int kPairedVectors = 3;
constexpr int64_t kPairedMinTokens = 16;  // below this the transpose costs more than it saves (decode: 1 token)

// The A rows a run reads: `count` of them, row(c) = (c / per_sub) * r_max + lo + c % per_sub.
struct PairedColumns {
  int64_t lo, per_sub, r_max, count, stride;  // stride: count rounded up to 16
  int64_t row(int64_t c) const { return (c / per_sub) * r_max + lo + c % per_sub; }
};

void transpose_to_pairs(const uint16_t* a, int64_t d_in, const PairedColumns& columns, uint32_t* a_pairs) {
  const int64_t pairs = d_in / 2;
  for (int64_t c = 0; c < columns.stride; ++c) {
    if (c >= columns.count) {
      for (int64_t p = 0; p < pairs; ++p) a_pairs[p * columns.stride + c] = 0;
      continue;
    }
    const uint16_t* row = a + columns.row(c) * d_in;
    for (int64_t p = 0; p < pairs; ++p) std::memcpy(&a_pairs[p * columns.stride + c], row + 2 * p, sizeof(uint32_t));
  }
}

// out[j, v0*16 : (v0+V)*16] (cut at `count`) = the paired columns times x_rows[j], for kPairedTokens tokens.
template <int V>
inline void paired_sums_vectors(const uint32_t* a_pairs, int64_t stride, int64_t count, int64_t pairs,
                                const uint16_t* const* x_rows, int64_t v0, float* out) {
  __m512 acc[kPairedTokens][V];
#pragma GCC unroll 8
  for (int j = 0; j < kPairedTokens; ++j)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) acc[j][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh a[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) a[v] = as_bh(_mm512_loadu_si512(a_pairs + p * stride + (v0 + v) * 16));
#pragma GCC unroll 8
    for (int j = 0; j < kPairedTokens; ++j) {
      uint32_t pair;
      std::memcpy(&pair, x_rows[j] + 2 * p, sizeof(pair));
      const __m512bh xb = as_bh(_mm512_set1_epi32(static_cast<int>(pair)));
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[j][v] = _mm512_dpbf16_ps(acc[j][v], a[v], xb);
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < kPairedTokens; ++j)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v)
      _mm512_mask_storeu_ps(out + j * count + (v0 + v) * 16, lane_mask(count - (v0 + v) * 16), acc[j][v]);
}

// out[j, :count] for the kPairedTokens tokens x_rows (out: [kPairedTokens, count], the paired columns' order).
inline void paired_sums(const uint32_t* a_pairs, const PairedColumns& columns, int64_t pairs,
                        const uint16_t* const* x_rows, float* out) {
  const int64_t vectors = columns.stride / 16;
  for (int64_t v0 = 0; v0 < vectors; v0 += kPairedVectors) {
    switch (std::min<int64_t>(kPairedVectors, vectors - v0)) {
      case 1: paired_sums_vectors<1>(a_pairs, columns.stride, columns.count, pairs, x_rows, v0, out); break;
      case 2: paired_sums_vectors<2>(a_pairs, columns.stride, columns.count, pairs, x_rows, v0, out); break;
      default: paired_sums_vectors<3>(a_pairs, columns.stride, columns.count, pairs, x_rows, v0, out); break;
    }
  }
}

// The order of the ops' work: runs of consecutive live rows of one slot (for the shrink also of one rank
// range), each run's rows taken token by token (in order of first row, a token's rows in plan order). The
// shrink computes A . x once per token of a run (a MoR token's experts differ only in λ_A); the expand
// transposes each B tile once per run and sums a token's rows in float32 before adding them to y.
struct TokenRows {
  int64_t token, begin, end;  // [begin, end) of RowOrder::rows
};
struct SlotRun {
  int64_t slot, begin, end;  // [begin, end) of RowOrder::tokens
};
struct RowOrder {
  std::vector<int64_t> rows;
  std::vector<TokenRows> tokens;
  std::vector<SlotRun> runs;
};

// lo / hi: the rows' rank ranges, or nullptr where runs need not share them.
RowOrder row_order(const int64_t* slot, const int64_t* token, const int32_t* slot_active, const int64_t* lo,
                   const int64_t* hi, int64_t num_rows, int64_t num_tokens) {
  RowOrder order;
  order.rows.reserve(num_rows);
  std::vector<int64_t> place(num_tokens, -1);  // a token's index in order.tokens within the current run
  for (int64_t n = 0; n < num_rows;) {
    int64_t stop = n + 1;
    while (stop < num_rows && slot[stop] == slot[n] && (lo == nullptr || (lo[stop] == lo[n] && hi[stop] == hi[n])))
      ++stop;
    if (live_row(slot[n], slot_active)) {
      const int64_t first = static_cast<int64_t>(order.tokens.size());
      for (int64_t m = n; m < stop; ++m) {  // count each token's rows in `end`
        if (place[token[m]] < 0) {
          place[token[m]] = static_cast<int64_t>(order.tokens.size());
          order.tokens.push_back({token[m], 0, 0});
        }
        ++order.tokens[place[token[m]]].end;
      }
      int64_t offset = static_cast<int64_t>(order.rows.size());
      for (int64_t k = first; k < static_cast<int64_t>(order.tokens.size()); ++k) {
        const int64_t count = order.tokens[k].end;
        order.tokens[k].begin = order.tokens[k].end = offset;
        offset += count;
      }
      order.rows.resize(offset);
      for (int64_t m = n; m < stop; ++m) order.rows[order.tokens[place[token[m]]].end++] = m;
      for (int64_t k = first; k < static_cast<int64_t>(order.tokens.size()); ++k) place[order.tokens[k].token] = -1;
      order.runs.push_back({slot[n], first, static_cast<int64_t>(order.tokens.size())});
    }
    n = stop;
  }
  return order;
}

struct Tile {
  int64_t col, sub;
  int cols;
};

void shrink_rows(const at::Tensor& x, const at::Tensor& a, const at::Tensor& coeff,
                 const at::Tensor& rank_lo, const at::Tensor& rank_hi, const RowOrder& order, int64_t num_subs,
                 const uint16_t* rank_scale, const int64_t* scale_idx, at::Tensor& h) {
  const int64_t d_in = x.size(1), width = a.size(1), r_max = width / num_subs;
  const auto* x_p = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const auto* a_p = reinterpret_cast<const uint16_t*>(a.data_ptr<at::BFloat16>());
  auto* h_p = h.data_ptr<at::BFloat16>();
  const int64_t *lo_p = rank_lo.data_ptr<int64_t>(), *hi_p = rank_hi.data_ptr<int64_t>();
  const float* coeff_p = coeff.data_ptr<float>();
  // the rank range of a run (its rows share it)
  auto run_ranks = [&](const SlotRun& run) {
    const int64_t some_row = order.rows[order.tokens[run.begin].begin];
    return std::pair<int64_t, int64_t>{std::max<int64_t>(lo_p[some_row], 0), std::min(hi_p[some_row], r_max)};
  };
  // Runs of at least kPairedMinTokens tokens (prefill segments) take the paired path: the A rows each reads
  // are transposed once per call (`transpose_to_pairs`), in parallel over those runs.
  std::vector<PairedColumns> columns(order.runs.size());
  std::vector<int64_t> pairs_at(order.runs.size(), -1);  // run -> offset of its pairs in `a_pairs`
  int64_t pairs_size = 0;
  for (size_t r = 0; r < order.runs.size(); ++r) {
    const auto [lo, hi] = run_ranks(order.runs[r]);
    if (d_in % 2 != 0 || hi <= lo || order.runs[r].end - order.runs[r].begin < kPairedMinTokens) continue;
    const int64_t count = num_subs * (hi - lo);
    columns[r] = {lo, hi - lo, r_max, count, (count + 15) / 16 * 16};
    pairs_at[r] = pairs_size;
    pairs_size += d_in / 2 * columns[r].stride;
  }
  std::unique_ptr<uint32_t[]> a_pairs(new uint32_t[pairs_size]);  // every element is written
  if (pairs_size > 0) {
    at::parallel_for(0, static_cast<int64_t>(order.runs.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        if (pairs_at[r] >= 0)
          transpose_to_pairs(a_p + order.runs[r].slot * width * d_in, d_in, columns[r], &a_pairs[pairs_at[r]]);
    });
  }
  // units of work of about one size: up to kGroup tokens of one run, or kPairedTokens of a paired run (a MoR
  // run's tokens spread over threads)
  struct Unit {
    int64_t run, first;
  };
  std::vector<Unit> units;
  for (int64_t r = 0; r < static_cast<int64_t>(order.runs.size()); ++r)
    for (int64_t k = order.runs[r].begin; k < order.runs[r].end; k += pairs_at[r] >= 0 ? kPairedTokens : kGroup)
      units.push_back({r, k});
  h.zero_();
  at::parallel_for(0, static_cast<int64_t>(units.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> sums(kPairedTokens * width);  // [tokens, width]: A . x of each token, before coeff and λ_A
    std::vector<float> paired(kPairedTokens * width);  // [tokens, count]: the same in the paired columns' order
    for (int64_t u = begin; u < end; ++u) {
      const SlotRun* run = &order.runs[units[u].run];
      const int64_t first = units[u].first;
      const bool is_paired = pairs_at[units[u].run] >= 0;
      const int count = static_cast<int>(std::min<int64_t>(is_paired ? kPairedTokens : kGroup, run->end - first));
      const auto [lo, hi] = run_ranks(*run);
      const uint16_t* x_rows[kPairedTokens];
      for (int j = 0; j < kPairedTokens; ++j)  // a short last unit repeats its last token
        x_rows[j] = x_p + order.tokens[first + std::min(j, count - 1)].token * d_in;
      if (is_paired) {
        const PairedColumns& used = columns[units[u].run];
        paired_sums(&a_pairs[pairs_at[units[u].run]], used, d_in / 2, x_rows, paired.data());
        for (int j = 0; j < count; ++j)
          for (int64_t i = 0; i < num_subs; ++i)
            std::memcpy(&sums[j * width + i * r_max + lo], &paired[j * used.count + i * used.per_sub],
                        used.per_sub * sizeof(float));
      } else {
        float out[kGroup];
        for (int64_t i = 0; i < num_subs; ++i) {
          for (int64_t r = lo; r < hi; ++r) {  // a rank range's rows are one sequential stream of A
            dot_group(a_p + (run->slot * width + i * r_max + r) * d_in, d_in, x_rows, count, out);
            for (int j = 0; j < count; ++j) sums[j * width + i * r_max + r] = out[j];
          }
        }
      }
      for (int j = 0; j < count; ++j) {
        const TokenRows& rows = order.tokens[first + j];
        for (int64_t m = rows.begin; m < rows.end; ++m) {
          const int64_t n = order.rows[m];
          const uint16_t* lambda = scale_row(rank_scale, scale_idx, width, n);
          for (int64_t i = 0; i < num_subs; ++i) {
            for (int64_t k = i * r_max + lo; k < i * r_max + hi; ++k) {
              const float value = sums[j * width + k] * coeff_p[n];
              h_p[n * width + k] = at::BFloat16(lambda == nullptr ? value : value * as_float(lambda[k]));
            }
          }
        }
      }
    }
  });
}

// One tile of `cols` (<= 16) columns of B[slot] ([., R] row-major: the tile is 16*R contiguous bfloat16,
// M = R/2 vectors of 32), transposed to t[p], lane c = the pair of ranks (2p, 2p+1) of column c, so each
// row's product is M vdpbf16ps into one vector of 16 column sums, with h's pairs broadcast. The transpose
// (log2(M) passes of deinterleaving, M permutes each) is paid once per tile for a group's rows.
template <int M>
__attribute__((always_inline)) inline void load_transposed_tile(const uint16_t* b_tile, int cols, __m512i* t) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  const int64_t valid = static_cast<int64_t>(cols) * 2 * M;
#pragma GCC unroll 64
  for (int j = 0; j < M; ++j) t[j] = _mm512_maskz_loadu_epi16(tail_mask(valid - 32 * j), b_tile + 32 * j);
  // dword f = column * M + pair; each pass moves f's lowest bit to the top, log2(M) passes give pair * 16 + column
  __m512i next[M];
#pragma GCC unroll 8
  for (int pass = 1; pass < M; pass *= 2) {
#pragma GCC unroll 32
    for (int k = 0; k < M / 2; ++k) {
      next[k] = _mm512_permutex2var_epi32(t[2 * k], even, t[2 * k + 1]);
      next[M / 2 + k] = _mm512_permutex2var_epi32(t[2 * k], odd, t[2 * k + 1]);
    }
#pragma GCC unroll 64
    for (int j = 0; j < M; ++j) t[j] = next[j];
  }
}

// The transposed tile times one row's h block (R bfloat16, read as M pairs): the row's 16 column sums.
template <int M>
__attribute__((always_inline)) inline __m512 tile_product(const __m512i* t, const uint16_t* h_block) {
  uint32_t pairs[M];
  std::memcpy(pairs, h_block, sizeof(pairs));
  __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};  // two chains of vdpbf16ps
#pragma GCC unroll 64
  for (int p = 0; p < M; ++p)
    acc[p % 2] = _mm512_dpbf16_ps(acc[p % 2], as_bh(t[p]), as_bh(_mm512_set1_epi32(static_cast<int>(pairs[p]))));
  return _mm512_add_ps(acc[0], acc[1]);
}

// Whether tokens k .. k + kInterleaved - 1 of the order have one row each, not scaled by λ_B.
constexpr int kInterleaved = 4;
inline bool plain_tokens(const RowOrder& order, int64_t k, const uint16_t* out_scale, const int64_t* scale_idx) {
  for (int j = 0; j < kInterleaved; ++j) {
    const TokenRows& rows = order.tokens[k + j];
    if (rows.end - rows.begin != 1 || (out_scale != nullptr && scale_idx[order.rows[rows.begin]] >= 0)) return false;
  }
  return true;
}

// tile_product for the single rows of kInterleaved tokens from k on, interleaved: a token's M vdpbf16ps form
// one dependency chain, and one token at a time left the core waiting on it.
template <int M>
inline void tile_products(const __m512i* t, const uint16_t* h, const RowOrder& order, int64_t k, int64_t width,
                          int64_t h_col, __m512* out) {
  const uint16_t* h_blocks[kInterleaved];
  for (int j = 0; j < kInterleaved; ++j) h_blocks[j] = h + order.rows[order.tokens[k + j].begin] * width + h_col;
#pragma GCC unroll 4
  for (int j = 0; j < kInterleaved; ++j) out[j] = _mm512_setzero_ps();
#pragma GCC unroll 64
  for (int p = 0; p < M; ++p) {
#pragma GCC unroll 4
    for (int j = 0; j < kInterleaved; ++j) {
      uint32_t pair;
      std::memcpy(&pair, h_blocks[j] + 2 * p, sizeof(pair));
      out[j] = _mm512_dpbf16_ps(out[j], as_bh(t[p]), as_bh(_mm512_set1_epi32(static_cast<int>(pair))));
    }
  }
}

// y_row[0:cols] (bfloat16) += delta, rounded once.
inline void add_to_row(at::BFloat16* y_row, __m512 delta, int cols) {
  const __mmask16 mask = lane_mask(cols);
  const __m512 y_f = load_as_float(reinterpret_cast<const uint16_t*>(y_row), mask);
  store_as_bf16(y_row, _mm512_add_ps(y_f, delta), mask);
}

// Whether no token has rows in two runs (a decode level of distinct adapters): then runs can go to different
// threads without two of them adding to one element of y.
bool runs_own_their_tokens(const RowOrder& order, int64_t num_tokens) {
  std::vector<int64_t> owner(num_tokens, -1);
  for (int64_t r = 0; r < static_cast<int64_t>(order.runs.size()); ++r)
    for (int64_t k = order.runs[r].begin; k < order.runs[r].end; ++k) {
      int64_t& run = owner[order.tokens[k].token];
      if (run >= 0 && run != r) return false;
      run = r;
    }
  return true;
}

template <int M>
void expand_rows(at::Tensor& y, const at::Tensor& b, const at::Tensor& h, const RowOrder& order,
                 const uint16_t* out_scale, const int64_t* scale_idx, const std::vector<Tile>& tiles) {
  constexpr int64_t R = 2 * M;
  const int64_t d_total = y.size(1), width = h.size(1);
  const auto* b_p = reinterpret_cast<const uint16_t*>(b.data_ptr<at::BFloat16>());
  const auto* h_p = reinterpret_cast<const uint16_t*>(h.data_ptr<at::BFloat16>());
  auto* y_p = y.data_ptr<at::BFloat16>();
  // every token's sum over one tile of one run, added to y by one thread; the transposed tile t is the
  // lambda's own, inlined, so it stays in registers (handed in from the caller, it went through the stack
  // on every tile: decode expands from L3 ran at half this speed)
  auto expand_tile = [&](const SlotRun& run, const Tile& tile) __attribute__((always_inline)) {
    __m512i t[M];
    const __mmask16 mask = lane_mask(tile.cols);
    load_transposed_tile<M>(b_p + (run.slot * d_total + tile.col) * R, tile.cols, t);
    for (int64_t k = run.begin; k < run.end; ++k) {
      const TokenRows& rows = order.tokens[k];
      if (k + kInterleaved <= run.end && plain_tokens(order, k, out_scale, scale_idx)) {
        // a prefill segment's tokens, kInterleaved at a time: independent chains of vdpbf16ps
        __m512 delta[kInterleaved];
        tile_products<M>(t, h_p, order, k, width, tile.sub * R, delta);
#pragma GCC unroll 4
        for (int j = 0; j < kInterleaved; ++j)
          add_to_row(y_p + order.tokens[k + j].token * d_total + tile.col, delta[j], tile.cols);
        k += kInterleaved - 1;
        continue;
      }
      __m512 delta = _mm512_setzero_ps();
      for (int64_t j = rows.begin; j < rows.end; ++j) {
        const int64_t n = order.rows[j];
        const __m512 product = tile_product<M>(t, h_p + n * width + tile.sub * R);
        const uint16_t* lambda = scale_row(out_scale, scale_idx, d_total, n);
        delta = lambda == nullptr ? _mm512_add_ps(delta, product)
                                  : _mm512_fmadd_ps(product, load_as_float(lambda + tile.col, mask), delta);
      }
      add_to_row(y_p + rows.token * d_total + tile.col, delta, tile.cols);
    }
  };
  const int64_t num_runs = static_cast<int64_t>(order.runs.size());
  // enough runs to share out (one long prompt's run still splits by columns over every thread)
  if (num_runs >= 2 * at::get_num_threads() && runs_own_their_tokens(order, y.size(0))) {
    // threads split the runs: each streams its slots' B whole (split by columns, each thread read part of
    // every slot's B, short streams across page ends: a decode step's expands at SmolLM2's shapes, 32
    // adapters, took 13.1 ms on two threads, split by runs 7.2-9.0 ms)
    at::parallel_for(0, num_runs, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        for (const Tile& tile : tiles) expand_tile(order.runs[r], tile);
    });
    return;
  }
  // threads split the column tiles; inside a tile every token's sum is added by one thread
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t begin, int64_t end) {
    for (const SlotRun& run : order.runs)
      for (int64_t i = begin; i < end; ++i) expand_tile(run, tiles[i]);
  });
}

// The plan's rows index the slot tensors and x / y: a bad index would read or write out of bounds, so check
// each live row (O(N), nothing next to reading A and B).
void check_rows(const at::Tensor& slot_active, const at::Tensor& slot, const at::Tensor& token, int64_t num_slots,
                int64_t num_tokens) {
  TORCH_CHECK(slot_active.scalar_type() == at::kInt && slot_active.is_contiguous() &&
              slot_active.size(0) == num_slots, "slot_active: [S] int32");
  TORCH_CHECK(slot.scalar_type() == at::kLong && token.scalar_type() == at::kLong && slot.is_contiguous() &&
              token.is_contiguous() && slot.size(0) == token.size(0), "slot / token: [N] int64");
  const int64_t* s = slot.data_ptr<int64_t>();
  const int64_t* t = token.data_ptr<int64_t>();
  for (int64_t n = 0; n < slot.size(0); ++n)
    TORCH_CHECK(s[n] < 0 || (s[n] < num_slots && t[n] >= 0 && t[n] < num_tokens), "row ", n, ": slot ", s[n],
                " of ", num_slots, ", token ", t[n], " of ", num_tokens);
}

// The pool's data where the level scales its rows (a pool and scale_idx given), else nullptr.
const uint16_t* scale_pool(const std::optional<at::Tensor>& pool, const std::optional<at::Tensor>& scale_idx,
                           const at::Tensor& slot, int64_t width) {
  if (!pool.has_value() || !scale_idx.has_value()) return nullptr;
  TORCH_CHECK(pool->scalar_type() == at::kBFloat16 && pool->dim() == 2 && pool->size(1) == width &&
              pool->is_contiguous(), "scaling-vector pool: [V + 1, ", width, "] bfloat16, contiguous");
  TORCH_CHECK(scale_idx->scalar_type() == at::kLong && scale_idx->is_contiguous() &&
              scale_idx->size(0) == slot.size(0), "scale_idx: [N] int64");
  const int64_t* rows = scale_idx->data_ptr<int64_t>();
  for (int64_t n = 0; n < slot.size(0); ++n)
    TORCH_CHECK(rows[n] >= -1 && rows[n] < pool->size(0), "row ", n, ": scale row ", rows[n], " of ", pool->size(0));
  return reinterpret_cast<const uint16_t*>(pool->data_ptr<at::BFloat16>());
}

const int64_t* scale_rows(const std::optional<at::Tensor>& scale_idx) {
  return scale_idx.has_value() ? scale_idx->data_ptr<int64_t>() : nullptr;
}

at::Tensor lora_shrink(const at::Tensor& x, const at::Tensor& a, const at::Tensor& slot_active,
                       const at::Tensor& slot, const at::Tensor& token, const at::Tensor& coeff,
                       const at::Tensor& rank_lo, const at::Tensor& rank_hi, int64_t num_subs,
                       const std::optional<at::Tensor>& rank_scale, const std::optional<at::Tensor>& scale_idx) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && a.scalar_type() == at::kBFloat16, "x, A: bfloat16");
  TORCH_CHECK(x.dim() == 2 && a.dim() == 3 && x.size(1) == a.size(2) && x.is_contiguous() && a.is_contiguous(),
              "x [T, d_in], A [S, W, d_in], contiguous");
  TORCH_CHECK(num_subs > 0 && a.size(1) % num_subs == 0, "A's width is num_subs * r_max");
  TORCH_CHECK(coeff.scalar_type() == at::kFloat && rank_lo.scalar_type() == at::kLong &&
              rank_hi.scalar_type() == at::kLong && coeff.is_contiguous() && rank_lo.is_contiguous() &&
              rank_hi.is_contiguous() && coeff.size(0) == slot.size(0) && rank_lo.size(0) == slot.size(0) &&
              rank_hi.size(0) == slot.size(0), "coeff: [N] float32, rank_lo / rank_hi: [N] int64");
  check_rows(slot_active, slot, token, a.size(0), x.size(0));
  const uint16_t* pool = scale_pool(rank_scale, scale_idx, slot, a.size(1));
  at::Tensor h = at::empty({slot.size(0), a.size(1)}, x.options());
  const RowOrder order = row_order(slot.data_ptr<int64_t>(), token.data_ptr<int64_t>(),
                                   slot_active.data_ptr<int32_t>(), rank_lo.data_ptr<int64_t>(),
                                   rank_hi.data_ptr<int64_t>(), slot.size(0), x.size(0));
  shrink_rows(x, a, coeff, rank_lo, rank_hi, order, num_subs, pool, scale_rows(scale_idx), h);
  return h;
}

void lora_expand(at::Tensor y, const at::Tensor& b, const at::Tensor& h, const at::Tensor& slot_active,
                 const at::Tensor& slot, const at::Tensor& token, at::IntArrayRef sub_starts,
                 const std::optional<at::Tensor>& out_scale, const std::optional<at::Tensor>& scale_idx) {
  TORCH_CHECK(y.scalar_type() == at::kBFloat16 && b.scalar_type() == at::kBFloat16 &&
              h.scalar_type() == at::kBFloat16, "y, B, h: bfloat16");
  TORCH_CHECK(y.dim() == 2 && b.dim() == 3 && h.dim() == 2 && y.size(1) == b.size(1) && y.is_contiguous() &&
              b.is_contiguous() && h.is_contiguous() && h.size(0) == slot.size(0),
              "y [T, d_total], B [S, d_total, r_max], h [N, num_subs * r_max], contiguous");
  const int64_t r_max = b.size(2), num_subs = static_cast<int64_t>(sub_starts.size());
  TORCH_CHECK(h.size(1) == num_subs * r_max, "h's width is len(sub_starts) * r_max");
  for (int64_t i = 0; i < num_subs; ++i)
    TORCH_CHECK(sub_starts[i] >= (i ? sub_starts[i - 1] : 0) && sub_starts[i] <= y.size(1),
                "sub_starts must rise within y's columns");
  check_rows(slot_active, slot, token, b.size(0), y.size(0));
  const uint16_t* pool = scale_pool(out_scale, scale_idx, slot, y.size(1));
  const int64_t* rows = scale_rows(scale_idx);
  const RowOrder order = row_order(slot.data_ptr<int64_t>(), token.data_ptr<int64_t>(),
                                   slot_active.data_ptr<int32_t>(), nullptr, nullptr, slot.size(0), y.size(0));
  std::vector<Tile> tiles;
  for (int64_t i = 0; i < num_subs; ++i) {
    const int64_t end = i + 1 < num_subs ? sub_starts[i + 1] : y.size(1);
    for (int64_t c = sub_starts[i]; c < end; c += kTile)
      tiles.push_back({c, i, static_cast<int>(std::min<int64_t>(kTile, end - c))});
  }
  switch (r_max) {
    case 2: return expand_rows<1>(y, b, h, order, pool, rows, tiles);
    case 4: return expand_rows<2>(y, b, h, order, pool, rows, tiles);
    case 8: return expand_rows<4>(y, b, h, order, pool, rows, tiles);
    case 16: return expand_rows<8>(y, b, h, order, pool, rows, tiles);
    case 32: return expand_rows<16>(y, b, h, order, pool, rows, tiles);
    case 64: return expand_rows<32>(y, b, h, order, pool, rows, tiles);
    case 128: return expand_rows<64>(y, b, h, order, pool, rows, tiles);
    default: TORCH_CHECK(false, "r_max must be a power of two from 2 to 128, got ", r_max);
  }
}

// shrink then expand in one call: a decode step runs 120 of these (4 linears x 30 layers at SmolLM2's
// shapes), and a second dispatch, row check and Python wrapper per linear cost about 1 ms of a 65 ms step.
void lora_apply(const at::Tensor& x, at::Tensor y, const at::Tensor& a, const at::Tensor& b,
                const at::Tensor& slot_active, const at::Tensor& slot, const at::Tensor& token, const at::Tensor& coeff,
                const at::Tensor& rank_lo, const at::Tensor& rank_hi, at::IntArrayRef sub_starts,
                const std::optional<at::Tensor>& rank_scale, const std::optional<at::Tensor>& out_scale,
                const std::optional<at::Tensor>& scale_idx) {
  const at::Tensor h = lora_shrink(x, a, slot_active, slot, token, coeff, rank_lo, rank_hi,
                                   static_cast<int64_t>(sub_starts.size()), rank_scale, scale_idx);
  lora_expand(y, b, h, slot_active, slot, token, sub_starts, out_scale, scale_idx);
}

}  // namespace

TORCH_LIBRARY(loramux_cpu_bgmv, m) {
  m.def("shrink(Tensor x, Tensor a, Tensor slot_active, Tensor slot, Tensor token, Tensor coeff, "
        "Tensor rank_lo, Tensor rank_hi, int num_subs, Tensor? rank_scale, Tensor? scale_idx) -> Tensor");
  m.def("expand(Tensor(a!) y, Tensor b, Tensor h, Tensor slot_active, Tensor slot, Tensor token, "
        "int[] sub_starts, Tensor? out_scale, Tensor? scale_idx) -> ()");
  m.def("apply(Tensor x, Tensor(a!) y, Tensor a, Tensor b, Tensor slot_active, Tensor slot, Tensor token, "
        "Tensor coeff, Tensor rank_lo, Tensor rank_hi, int[] sub_starts, Tensor? rank_scale, Tensor? out_scale, "
        "Tensor? scale_idx) -> ()");
  m.impl("shrink", c10::DispatchKey::CPU, TORCH_FN(lora_shrink));
  m.impl("apply", c10::DispatchKey::CPU, TORCH_FN(lora_apply));
  m.impl("expand", c10::DispatchKey::CPU, TORCH_FN(lora_expand));
}
