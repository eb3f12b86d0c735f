// CPU kernels for the decoder's small operations, where torch's own spend more time dispatching than computing.
//
// decode_attention: one-token attention. torch's SDPA runs a flash-attention kernel built for long sequences;
// at one query per row it spends most of a decode step's attention time setting up ~100 tiny blocks per layer
// (32 rows x 3 key/value heads). This does the same arithmetic directly: one task per (row, key/value head),
// its group of query heads scored against every key, softmax and the weighted sum of values, all in fp32
// whatever the cache's dtype.
//
// Shared prefix: after one prefill is copied to n rows, their first `prefix` positions are identical. A row
// may then read those positions from a source row (`prefix_rows`) instead of its own copy, so that the
// prompt's keys and values come from memory once per group of rows rather than once per row.
//
// rms_norm: transformers' LlamaRMSNorm in one pass over each row, where torch runs ~8 operations (a bf16 input
// goes to fp32, squared, averaged, ...), each a few microseconds at decode sizes.
//
// small_linear: a linear layer for one or two rows. oneDNN's products are laid out for many rows; at one row a
// product is one pass over the weights, which this makes at the memory's pace: 16 weight rows at a time,
// their dot products with the input row summed in fp32 (bf16 pairs with AVX512-BF16's dot-product instruction
// where the CPU has it). The weights stay as nn.Linear holds them, so nothing is copied or packed.
//
// rotary and silu_mul: the element-wise steps between a layer's products (transformers' rotary embedding of
// queries and keys; silu(gate) * up), each one pass where torch runs three to five operations of ~15-45 us at
// 32 rows; in bf16 each result is rounded where torch rounds it.
//
// top_k: the k largest logits of each row and their ids, for the sampler's top-k and top-p. torch's CPU topk
// took ~1.4 ms a step for 32 rows of SmolLM2's 49,152 logits. This takes the maximum of every block of 64 logits
// first: the k-th largest of those maxima is a floor the k largest logits cannot be under (k blocks each hold a
// logit that high), so only the blocks that reach it are searched and sorted.
//
// screened_top_k: the k largest outputs of an fp32 linear layer (the decoder's output layer, for top-k sampling or
// greedy) from its product in bf16: each bf16 output is within a bound of the fp32 one, so only the outputs whose
// bound reaches the k-th largest lower bound are computed in fp32: a median of 84 of SmolLM2's 49,152 a row at k = 50.
//
// panel_linear: a linear layer for fp32 batches (three rows and more). oneDNN's fp32 products of a 32-row decode
// step ran at 130-146 GFLOP/s on the development CPU, whose arithmetic peaks near 200; this reaches ~180 (the
// README has the figures). The weight is packed once in panels of 48 output columns (`pack_panels`), each
// panel's values in the order the loop reads them; 8 rows of the input against one panel keep 8 x 48 running
// sums in 24 registers, and while a thread computes one panel it prefetches its next, so that the weights
// stream from memory under the arithmetic.
//
// decode_layer: a whole decoder layer of a one-token step in one call from Python, the kernels above chained
// here (LlamaDecoder.forward's loop dispatches ~30 operations a layer, ~35 us of a 32-row fp32 layer's ~1.8 ms).
//
// Lanes: 16 fp32 values. With AVX-512 they are one register; elsewhere (or built with LAB_PORTABLE) a plain
// array whose loops the compiler vectorises. The attention below is written once against these few functions.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && !defined(LAB_PORTABLE)
#include <immintrin.h>
#define LAB_AVX512 1
#endif

namespace {

inline float widen(float x) { return x; }
inline float widen(c10::BFloat16 x) {  // a bf16 is the top half of an fp32
  const uint32_t bits = uint32_t(x.x) << 16;
  float result;
  std::memcpy(&result, &bits, sizeof result);
  return result;
}

#ifdef LAB_AVX512
using Lanes = __m512;
inline Lanes load_lanes(const float* p) { return _mm512_loadu_ps(p); }
inline Lanes load_lanes(const c10::BFloat16* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline Lanes broadcast(float x) { return _mm512_set1_ps(x); }
inline Lanes multiply(Lanes a, Lanes b) { return _mm512_mul_ps(a, b); }
inline Lanes add(Lanes a, Lanes b) { return _mm512_add_ps(a, b); }
inline Lanes multiply_add(Lanes a, Lanes b, Lanes c) { return _mm512_fmadd_ps(a, b, c); }
inline float sum(Lanes a) { return _mm512_reduce_add_ps(a); }
inline void store(float* p, Lanes a) { _mm512_storeu_ps(p, a); }
// out[0..3] = the sums of a, b, c and d: one reduction for four keys instead of four
inline void sum4(Lanes a, Lanes b, Lanes c, Lanes d, float* out) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  // each 128-bit block: a, b, c, d summed over that block
  const __m512 blocks = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                                      _mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 halves = _mm512_add_ps(blocks, _mm512_shuffle_f32x4(blocks, blocks, _MM_SHUFFLE(1, 0, 3, 2)));
  const __m512 total = _mm512_add_ps(halves, _mm512_shuffle_f32x4(halves, halves, _MM_SHUFFLE(2, 3, 0, 1)));
  _mm_storeu_ps(out, _mm512_castps512_ps128(total));
}
#else
struct Lanes { float v[16]; };
template <typename scalar_t>
inline Lanes load_lanes(const scalar_t* p) { Lanes r; for (int e = 0; e < 16; ++e) r.v[e] = widen(p[e]); return r; }
inline Lanes broadcast(float x) { Lanes r; for (int e = 0; e < 16; ++e) r.v[e] = x; return r; }
inline Lanes multiply(Lanes a, Lanes b) { for (int e = 0; e < 16; ++e) a.v[e] *= b.v[e]; return a; }
inline Lanes add(Lanes a, Lanes b) { for (int e = 0; e < 16; ++e) a.v[e] += b.v[e]; return a; }
inline Lanes multiply_add(Lanes a, Lanes b, Lanes c) { for (int e = 0; e < 16; ++e) c.v[e] += a.v[e] * b.v[e]; return c; }
inline float sum(Lanes a) { float s = 0.f; for (int e = 0; e < 16; ++e) s += a.v[e]; return s; }
inline void store(float* p, Lanes a) { std::memcpy(p, a.v, sizeof a.v); }
inline void sum4(Lanes a, Lanes b, Lanes c, Lanes d, float* out) {
  out[0] = sum(a), out[1] = sum(b), out[2] = sum(c), out[3] = sum(d);
}
#endif

// Where one task reads: its own row's keys/values, and the first `prefix` positions from the source row.
template <typename scalar_t>
struct Rows {
  const scalar_t *keys, *values, *prefix_keys, *prefix_values;
  int64_t prefix;
  const scalar_t* key(int64_t j, int dim) const { return (j < prefix ? prefix_keys : keys) + j * dim; }
  const scalar_t* value(int64_t j, int dim) const { return (j < prefix ? prefix_values : values) + j * dim; }
};

// G query heads of one key/value head of one row, over `length` positions; head_dim = 16 * C. They are
// scored and summed together, key by key and value by value, so that each key and value comes from memory
// once for the G heads rather than once per head. `scores` has room for G * length floats.
template <typename scalar_t, int C, int G>
void attend_heads(const scalar_t* query, int64_t query_stride, const Rows<scalar_t>& rows, int64_t length,
                  const scalar_t* mask, float scale, float* scores, scalar_t* out, int64_t out_stride) {
  constexpr int D = 16 * C;
  Lanes q[G][C];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) q[g][c] = multiply(load_lanes(query + g * query_stride + 16 * c), broadcast(scale));
  auto dot = [&](int g, const scalar_t* key) {  // the 16 partial sums of query g . key
    Lanes products = multiply(q[g][0], load_lanes(key));
    for (int c = 1; c < C; ++c) products = multiply_add(q[g][c], load_lanes(key + 16 * c), products);
    return products;
  };
  // four keys at a time: the G heads read them while they are in the L1 cache, and one reduction gives the
  // four sums of a head
  const int64_t quads = length / 4 * 4;
  for (int64_t j = 0; j < quads; j += 4) {
    const scalar_t *k0 = rows.key(j, D), *k1 = rows.key(j + 1, D), *k2 = rows.key(j + 2, D), *k3 = rows.key(j + 3, D);
    for (int g = 0; g < G; ++g) sum4(dot(g, k0), dot(g, k1), dot(g, k2), dot(g, k3), scores + g * length + j);
  }
  for (int64_t j = quads; j < length; ++j)
    for (int g = 0; g < G; ++g) scores[g * length + j] = sum(dot(g, rows.key(j, D)));
  float totals[G];
  for (int g = 0; g < G; ++g) {
    float* row = scores + g * length;
    if (mask)
      for (int64_t j = 0; j < length; ++j) row[j] += widen(mask[j]);
    float top = row[0];  // not -INFINITY: built with -ffast-math, which assumes finite numbers
    for (int64_t j = 1; j < length; ++j) top = std::max(top, row[j]);
    float total = 0.f;
    for (int64_t j = 0; j < length; ++j) {
      row[j] = std::exp(row[j] - top);
      total += row[j];
    }
    totals[g] = total;
  }
  Lanes sums[G][C];  // G * C independent running sums: enough for the multiply-adds not to wait on each other
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) sums[g][c] = broadcast(0.f);
  for (int64_t j = 0; j < length; ++j) {
    const scalar_t* value = rows.value(j, D);
    Lanes v[C];
    for (int c = 0; c < C; ++c) v[c] = load_lanes(value + 16 * c);
    for (int g = 0; g < G; ++g) {
      const Lanes p = broadcast(scores[g * length + j]);
      for (int c = 0; c < C; ++c) sums[g][c] = multiply_add(p, v[c], sums[g][c]);
    }
  }
  for (int g = 0; g < G; ++g) {
    float result[D];
    for (int c = 0; c < C; ++c) store(result + 16 * c, multiply(sums[g][c], broadcast(1.f / totals[g])));
    for (int e = 0; e < D; ++e) out[g * out_stride + e] = static_cast<scalar_t>(result[e]);
  }
}

// The `groups` query heads of one key/value head, G at a time: as many as the registers hold (4 heads of 64
// values, 2 of 128).
template <typename scalar_t, int C>
void attend_group(const scalar_t* query, int64_t query_stride, int64_t groups, const Rows<scalar_t>& rows,
                  int64_t length, const scalar_t* mask, float scale, float* scores, scalar_t* out, int64_t out_stride) {
  constexpr int most = C <= 4 ? 4 : 2;
  for (int64_t first = 0; first < groups; first += most) {
    const scalar_t* q = query + first * query_stride;
    scalar_t* o = out + first * out_stride;
    switch (std::min<int64_t>(most, groups - first)) {
      case 1: attend_heads<scalar_t, C, 1>(q, query_stride, rows, length, mask, scale, scores, o, out_stride); break;
      case 2: attend_heads<scalar_t, C, 2>(q, query_stride, rows, length, mask, scale, scores, o, out_stride); break;
      case 3: attend_heads<scalar_t, C, 3>(q, query_stride, rows, length, mask, scale, scores, o, out_stride); break;
      default: attend_heads<scalar_t, C, most>(q, query_stride, rows, length, mask, scale, scores, o, out_stride);
    }
  }
}

template <typename scalar_t, int C>
void attend(const torch::Tensor& query, const torch::Tensor& keys, const torch::Tensor& values,
            const torch::Tensor& mask, const torch::Tensor& prefix_rows, int64_t prefix, double scale,
            torch::Tensor& out) {
  const int64_t kv_heads = query.size(1), groups = query.size(2), length = keys.size(2);
  const scalar_t* k = keys.data_ptr<scalar_t>();
  const scalar_t* v = values.data_ptr<scalar_t>();
  const int64_t* source = prefix_rows.defined() ? prefix_rows.data_ptr<int64_t>() : nullptr;
  at::parallel_for(0, query.size(0) * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(4 * length);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / kv_heads, head = task % kv_heads, from = source ? source[row] : row;
      const Rows<scalar_t> rows{k + row * keys.stride(0) + head * keys.stride(1),
                                v + row * values.stride(0) + head * values.stride(1),
                                k + from * keys.stride(0) + head * keys.stride(1),
                                v + from * values.stride(0) + head * values.stride(1), source ? prefix : 0};
      attend_group<scalar_t, C>(query.data_ptr<scalar_t>() + row * query.stride(0) + head * query.stride(1),
                               query.stride(2), groups, rows, length,
                               mask.defined() ? mask.data_ptr<scalar_t>() + row * mask.stride(0) : nullptr,
                               float(scale), scores.data(),
                               out.data_ptr<scalar_t>() + row * out.stride(0) + head * out.stride(1), out.stride(2));
    }
  });
}

// R weight rows against M input rows, each of length K: out[m * out_stride + r] = w_r . x_m in fp32.
// `x` is the input as given (bf16 for the dot-product instruction), `x_wide` the same in fp32.
template <typename scalar_t, int M, int R>
void weight_rows(const scalar_t* w, int64_t K, const scalar_t* x, const float* x_wide, float* out, int64_t out_stride) {
  Lanes sums[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) sums[m][r] = broadcast(0.f);
  int64_t k = 0;
#if defined(LAB_AVX512) && defined(__AVX512BF16__)
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {  // 32 bf16 pairs per instruction, products exact in fp32
    for (; k + 32 <= K; k += 32) {
      __m512bh weights[R];
      for (int r = 0; r < R; ++r) weights[r] = (__m512bh)_mm512_loadu_si512(w + r * K + k);
      for (int m = 0; m < M; ++m) {
        const __m512bh input = (__m512bh)_mm512_loadu_si512(x + m * K + k);
        for (int r = 0; r < R; ++r) sums[m][r] = _mm512_dpbf16_ps(sums[m][r], weights[r], input);
      }
    }
  }
#endif
  for (; k + 16 <= K; k += 16) {
    Lanes weights[R];
    for (int r = 0; r < R; ++r) weights[r] = load_lanes(w + r * K + k);
    for (int m = 0; m < M; ++m) {
      const Lanes input = load_lanes(x_wide + m * K + k);
      for (int r = 0; r < R; ++r) sums[m][r] = multiply_add(weights[r], input, sums[m][r]);
    }
  }
  for (int m = 0; m < M; ++m) {
    float totals[R];
    if constexpr (R % 4 == 0)
      for (int r = 0; r < R; r += 4) sum4(sums[m][r], sums[m][r + 1], sums[m][r + 2], sums[m][r + 3], totals + r);
    else
      for (int r = 0; r < R; ++r) totals[r] = sum(sums[m][r]);
    for (int64_t j = k; j < K; ++j)  // the last K % 16 values
      for (int r = 0; r < R; ++r) totals[r] += widen(w[r * K + j]) * x_wide[m * K + j];
    for (int r = 0; r < R; ++r) out[m * out_stride + r] = totals[r];
  }
}

template <typename scalar_t, int M>
void small_linear_rows(const torch::Tensor& x, const torch::Tensor& x_wide, const std::vector<torch::Tensor>& weights,
                       torch::Tensor& out_wide) {
  // weight rows per block: 16 for one input row, 8 for two (their running sums fill most of the 32 registers);
  // more rows read at once kept the memory busier (fp32, one row: 4 rows 29.9 ms, 8 rows 26.3 ms, 16 rows 24.5
  // ms per step's 211 weights, against oneDNN's 34.8-35.9 ms)
  constexpr int R = 16 / M;
  const int64_t K = x.size(1), width = out_wide.size(1);
  std::vector<int64_t> first_block{0}, first_column{0};  // per weight: its first block of R rows, first output
  for (const auto& weight : weights) {
    first_block.push_back(first_block.back() + (weight.size(0) + R - 1) / R);
    first_column.push_back(first_column.back() + weight.size(0));
  }
  const scalar_t* input = x.data_ptr<scalar_t>();
  const float* input_wide = x_wide.data_ptr<float>();
  float* out = out_wide.data_ptr<float>();
  at::parallel_for(0, first_block.back(), 8, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      size_t i = 0;
      while (block >= first_block[i + 1]) ++i;
      const int64_t row = R * (block - first_block[i]), rows = weights[i].size(0);
      const scalar_t* w = weights[i].data_ptr<scalar_t>() + row * K;
      float* o = out + first_column[i] + row;
      if (row + R <= rows) weight_rows<scalar_t, M, R>(w, K, input, input_wide, o, width);
      else
        for (int64_t r = 0; r < rows - row; ++r)
          weight_rows<scalar_t, M, 1>(w + r * K, K, input, input_wide, o + r, width);
    }
  });
}

// Panels of PANEL_COLUMNS output columns (three lanes), against PANEL_ROWS rows of the input at a time.
constexpr int PANEL_LANES = 3;
constexpr int64_t PANEL_COLUMNS = 16 * PANEL_LANES, PANEL_ROWS = 8;

// How many panels hold `out_features` columns.
inline int64_t panel_count(int64_t out_features) { return (out_features + PANEL_COLUMNS - 1) / PANEL_COLUMNS; }

inline void prefetch(const char* address) {
#if defined(__GNUC__)
  __builtin_prefetch(address);
#endif
}

// R rows of x (each K long) times one panel (K x PANEL_COLUMNS, column-fastest): out[m * out_stride + c] for
// the first `columns` columns, plus bias[c] and then residual[m * out_stride + c] when given. Meanwhile one cache
// line per k from `next` (a part of the thread's next panel) is prefetched, when `next` is not null.
template <int R>
void panel_rows(const float* x, int64_t K, const float* panel, const float* bias, const float* residual, float* out,
                int64_t out_stride, int64_t columns, const char* next) {
  Lanes sums[R][PANEL_LANES];
  for (int m = 0; m < R; ++m)
    for (int v = 0; v < PANEL_LANES; ++v) sums[m][v] = broadcast(0.f);
  for (int64_t k = 0; k < K; ++k) {
    if (next) prefetch(next + k * 64);
    Lanes weights[PANEL_LANES];
    for (int v = 0; v < PANEL_LANES; ++v) weights[v] = load_lanes(panel + k * PANEL_COLUMNS + 16 * v);
    for (int m = 0; m < R; ++m) {
      const Lanes input = broadcast(x[m * K + k]);
      for (int v = 0; v < PANEL_LANES; ++v) sums[m][v] = multiply_add(input, weights[v], sums[m][v]);
    }
  }
  for (int m = 0; m < R; ++m) {
    float tile[PANEL_COLUMNS];
    for (int v = 0; v < PANEL_LANES; ++v) store(tile + 16 * v, sums[m][v]);
    for (int64_t c = 0; c < columns; ++c) {
      const float biased = tile[c] + (bias ? bias[c] : 0.f);  // -ffast-math may add bias and residual in any order
      out[m * out_stride + c] = residual ? biased + residual[m * out_stride + c] : biased;
    }
  }
}

// panel_rows for R = `rows` (1..PANEL_ROWS: the last rows of x may be fewer), chosen at run time.
template <int R = PANEL_ROWS>
void panel_rows_up_to(int64_t rows, const float* x, int64_t K, const float* panel, const float* bias,
                      const float* residual, float* out, int64_t out_stride, int64_t columns, const char* next) {
  if constexpr (R > 1)
    if (rows < R)
      return panel_rows_up_to<R - 1>(rows, x, K, panel, bias, residual, out, out_stride, columns, next);
  panel_rows<R>(x, K, panel, bias, residual, out, out_stride, columns, next);
}

// `value` rounded to scalar_t and back: where torch's bf16 operations round each result.
template <typename scalar_t>
inline float rounded(float value) { return widen(static_cast<scalar_t>(value)); }

// The largest of `width` values; `nan` set when one is NaN (by its bits: -ffast-math lets the compiler assume
// there is none).
inline float block_maximum(const float* values, int64_t width, uint32_t& nan) {
  float top = values[0];
  for (int64_t j = 0; j < width; ++j) {
    uint32_t bits;
    std::memcpy(&bits, values + j, sizeof bits);
    nan |= (bits & 0x7fffffffu) > 0x7f800000u;
    top = top > values[j] ? top : values[j];
  }
  return top;
}

// top_k and screened_top_k look at the maximum of each block of this many outputs first.
constexpr int64_t TOP_K_BLOCK = 64;

// What top_k and screened_top_k give a row holding NaN: NaN values (torch.topk ranks NaN first; the sampler's
// draw then refuses the row) and ids 0..k-1.
inline void write_nan_row(int64_t k, float* out, int64_t* out_ids) {
  std::fill(out, out + k, std::numeric_limits<float>::quiet_NaN());
  for (int64_t i = 0; i < k; ++i) out_ids[i] = i;
}

// The k best of `candidates` (value, id) into out and out_ids, best first, ids of equal values in ascending order.
void write_best(std::vector<std::pair<float, int64_t>>& candidates, int64_t k, float* out, int64_t* out_ids) {
  auto better = [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  std::partial_sort(candidates.begin(), candidates.begin() + k, candidates.end(), better);
  for (int64_t i = 0; i < k; ++i) out[i] = candidates[i].first, out_ids[i] = candidates[i].second;
}

// The k-th largest of `values` (k <= their count), sorted partly in `scratch`.
inline float kth_largest(const std::vector<float>& values, int64_t k, std::vector<float>& scratch) {
  scratch = values;
  std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(), std::greater<float>());
  return scratch[k - 1];
}

// screened_top_k's bound on the error of an approximation a_j: e_j = d_j A + n_j B + n'_j C + |a_j| R + 1e-6, the
// last term for what the relative ones miss (denormal inputs, which AVX512-BF16 flushes to zero).
struct ErrorBound {
  float A, B, C, R;
  // One block of `width` approximations: their errors into `errors`; the largest lower and upper bounds.
  std::pair<float, float> block(const c10::BFloat16* a, const float* d, const float* n, const float* n_rounded,
                                int64_t width, float* errors) const {
    float low = std::numeric_limits<float>::lowest(), high = low;
    for (int64_t j = 0; j < width; ++j) {
      const float value = widen(a[j]);
      const float error = d[j] * A + n[j] * B + n_rounded[j] * C + std::abs(value) * R + 1e-6f;
      errors[j] = error;
      low = std::max(low, value - error);
      high = std::max(high, value + error);
    }
    return {low, high};
  }
};

// Calls run(zero) with a zero of the C++ type of `type`: c10::BFloat16 or float.
template <typename Run>
void with_dtype(at::ScalarType type, Run run) {
  if (type == at::kBFloat16) run(c10::BFloat16());
  else if (type == at::kFloat) run(0.f);
  else TORCH_CHECK(false, "dtype ", type, " is not bfloat16 or float32");
}

}  // namespace

// query (rows, kv_heads, groups, head_dim); keys, values (rows, kv_heads, length, head_dim), each position's
// head_dim values contiguous and positions adjacent; mask: additive (rows, length) in the query's dtype, or
// none; prefix_rows (rows,) int64: row r reads positions [0, prefix) from row prefix_rows[r]. Returns the
// attention output (rows, kv_heads, groups, head_dim).
torch::Tensor decode_attention(torch::Tensor query, torch::Tensor keys, torch::Tensor values,
                               c10::optional<torch::Tensor> mask, c10::optional<torch::Tensor> prefix_rows,
                               int64_t prefix, double scale) {
  TORCH_CHECK(query.device().is_cpu(), "decode_attention runs on CPU tensors");
  TORCH_CHECK(query.dim() == 4 && keys.dim() == 4 && values.dim() == 4, "query, keys and values must be 4-D");
  const int64_t dim = query.size(3);
  TORCH_CHECK(keys.scalar_type() == query.scalar_type() && values.scalar_type() == query.scalar_type(),
              "query, keys and values must share a dtype");
  TORCH_CHECK(query.stride(3) == 1 && keys.stride(3) == 1 && values.stride(3) == 1 && keys.stride(2) == dim &&
              values.stride(2) == dim, "each position's head_dim values must be contiguous, positions adjacent");
  TORCH_CHECK(keys.size(0) == query.size(0) && keys.size(1) == query.size(1) && keys.size(3) == dim &&
              values.sizes() == keys.sizes(), "shapes do not match");
  TORCH_CHECK(keys.size(2) > 0, "no positions to attend to");
  torch::Tensor additive = mask.has_value() ? *mask : torch::Tensor();
  if (additive.defined())
    TORCH_CHECK(additive.dim() == 2 && additive.size(0) == query.size(0) && additive.size(1) == keys.size(2) &&
                additive.stride(1) == 1 && additive.scalar_type() == query.scalar_type(),
                "mask must be (rows, length), contiguous in length, in the query's dtype");
  torch::Tensor sources = prefix_rows.has_value() ? prefix_rows->contiguous() : torch::Tensor();
  if (sources.defined()) {
    TORCH_CHECK(sources.scalar_type() == torch::kLong && sources.numel() == query.size(0) && prefix >= 0 &&
                prefix <= keys.size(2), "prefix_rows must be (rows,) int64 and prefix within the length");
    const int64_t* source = sources.data_ptr<int64_t>();
    for (int64_t row = 0; row < sources.numel(); ++row)
      TORCH_CHECK(source[row] >= 0 && source[row] < query.size(0), "prefix_rows[", row, "] = ", source[row],
                  " is not a row");
  }
  auto out = torch::empty(query.sizes(), query.options());
  auto run = [&](auto zero) {
    using scalar_t = decltype(zero);
    switch (dim) {  // one build per head size: the loops over a head's values unroll into registers
      case 16: attend<scalar_t, 1>(query, keys, values, additive, sources, prefix, scale, out); break;
      case 32: attend<scalar_t, 2>(query, keys, values, additive, sources, prefix, scale, out); break;
      case 64: attend<scalar_t, 4>(query, keys, values, additive, sources, prefix, scale, out); break;
      case 128: attend<scalar_t, 8>(query, keys, values, additive, sources, prefix, scale, out); break;
      default: TORCH_CHECK(false, "head_dim ", dim, " is not 16, 32, 64 or 128");
    }
  };
  with_dtype(query.scalar_type(), run);
  return out;
}

// transformers' LlamaRMSNorm over the last dimension: weight * round(x * rsqrt(mean(x^2) + eps)), computed in
// fp32 and rounded to x's dtype where transformers rounds (after normalising, after the weight).
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "rms_norm runs on CPU tensors");
  TORCH_CHECK(weight.dim() == 1 && x.size(-1) == weight.size(0) && weight.scalar_type() == x.scalar_type(),
              "weight must be (hidden,) in x's dtype");
  const torch::Tensor input = x.contiguous(), scale = weight.contiguous();
  auto out = torch::empty_like(input);
  const int64_t width = input.size(-1), rows = width ? input.numel() / width : 0;
  auto run = [&](auto zero) {
    using scalar_t = decltype(zero);
    const scalar_t *in = input.data_ptr<scalar_t>(), *w = scale.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const scalar_t* values = in + row * width;
        float squares = 0.f;
        for (int64_t e = 0; e < width; ++e) squares += widen(values[e]) * widen(values[e]);
        const float inverse = 1.f / std::sqrt(squares / float(width) + float(eps));
        for (int64_t e = 0; e < width; ++e) {
          const scalar_t normed = static_cast<scalar_t>(widen(values[e]) * inverse);
          o[row * width + e] = static_cast<scalar_t>(widen(w[e]) * widen(normed));
        }
      }
    });
  };
  with_dtype(x.scalar_type(), run);
  return out;
}

// x (rows, K), rows 1 or 2, times each weight (N_i, K)^T, the outputs side by side (rows, sum N_i), plus bias
// (sum N_i) when given; summed in fp32, rounded once to x's dtype.
torch::Tensor small_linear(torch::Tensor x, std::vector<torch::Tensor> weights, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && (x.size(0) == 1 || x.size(0) == 2),
              "x must be a CPU tensor of 1 or 2 rows (rows, in_features)");
  TORCH_CHECK(!weights.empty(), "no weights");
  int64_t width = 0;
  for (const auto& weight : weights) {
    TORCH_CHECK(weight.device().is_cpu() && weight.dim() == 2 && weight.size(1) == x.size(1) &&
                weight.is_contiguous() && weight.scalar_type() == x.scalar_type(),
                "each weight must be (out_features, in_features), contiguous, in x's dtype, with x's in_features");
    width += weight.size(0);
  }
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == width && bias->scalar_type() == x.scalar_type(),
                "bias must be (sum of out_features,) in x's dtype");
  const torch::Tensor input = x.contiguous(), input_wide = input.to(torch::kFloat).contiguous();
  auto out_wide = torch::empty({x.size(0), width}, x.options().dtype(torch::kFloat));
  auto run = [&](auto zero) {
    using scalar_t = decltype(zero);
    if (x.size(0) == 1) small_linear_rows<scalar_t, 1>(input, input_wide, weights, out_wide);
    else small_linear_rows<scalar_t, 2>(input, input_wide, weights, out_wide);
  };
  with_dtype(x.scalar_type(), run);
  if (bias.has_value()) out_wide += bias->to(torch::kFloat);
  return out_wide.to(x.scalar_type());
}

// x (rows, heads, tokens, D) with each head's D values contiguous; cos, signed_sin (rows, 1, tokens, D) contiguous,
// the sine's first half negated. Returns x * cos + roll(x, D / 2) * signed_sin, contiguous: transformers'
// x * cos + rotate_half(x) * sin with rotate_half(x) = (-x2, x1), each product and the sum rounded to x's dtype.
torch::Tensor rotary(torch::Tensor x, torch::Tensor cos, torch::Tensor signed_sin) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4 && x.stride(3) == 1 && x.size(3) % 2 == 0,
              "x must be a CPU (rows, heads, tokens, head_dim) tensor, head_dim even and contiguous");
  const int64_t rows = x.size(0), heads = x.size(1), tokens = x.size(2), D = x.size(3), half = D / 2;
  for (const auto* table : {&cos, &signed_sin})
    TORCH_CHECK(table->sizes() == torch::IntArrayRef({rows, 1, tokens, D}) && table->is_contiguous() &&
                table->scalar_type() == x.scalar_type(), "cos and sin must be (rows, 1, tokens, head_dim), contiguous, "
                "in x's dtype");
  auto out = torch::empty({rows, heads, tokens, D}, x.options());
  auto run = [&](auto zero) {
    using scalar_t = decltype(zero);
    const scalar_t *in = x.data_ptr<scalar_t>(), *c = cos.data_ptr<scalar_t>(), *s = signed_sin.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows * heads * tokens, 64, [&](int64_t begin, int64_t end) {
      for (int64_t vector = begin; vector < end; ++vector) {
        const int64_t row = vector / (heads * tokens), head = vector / tokens % heads, token = vector % tokens;
        const scalar_t* v = in + row * x.stride(0) + head * x.stride(1) + token * x.stride(2);
        const int64_t angle = (row * tokens + token) * D;
        for (int64_t e = 0; e < D; ++e) {
          const float turned = widen(v[e < half ? e + half : e - half]);
          o[vector * D + e] = static_cast<scalar_t>(rounded<scalar_t>(widen(v[e]) * widen(c[angle + e])) +
                                                    rounded<scalar_t>(turned * widen(s[angle + e])));
        }
      }
    });
  };
  with_dtype(x.scalar_type(), run);
  return out;
}

// gate_up (..., 2 * I) contiguous: the gate's I values, then up's. Returns silu(gate) * up (..., I), silu rounded
// to the dtype before the product, as torch's two operations round.
torch::Tensor silu_mul(torch::Tensor gate_up) {
  TORCH_CHECK(gate_up.device().is_cpu() && gate_up.dim() >= 1 && gate_up.size(-1) % 2 == 0,
              "gate_up must be a CPU tensor whose last dimension (gate, then up) is even");
  const torch::Tensor input = gate_up.contiguous();
  const int64_t I = input.size(-1) / 2, rows = I ? input.numel() / (2 * I) : 0;
  std::vector<int64_t> shape(input.sizes().begin(), input.sizes().end());
  shape.back() = I;
  auto out = torch::empty(shape, input.options());
  auto run = [&](auto zero) {
    using scalar_t = decltype(zero);
    const scalar_t* in = input.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const scalar_t *gate = in + row * 2 * I, *up = gate + I;
        for (int64_t e = 0; e < I; ++e) {
          const float g = widen(gate[e]);
          o[row * I + e] = static_cast<scalar_t>(rounded<scalar_t>(g / (1.f + std::exp(-g))) * widen(up[e]));
        }
      }
    });
  };
  with_dtype(input.scalar_type(), run);
  return out;
}

// logits (rows, V) fp32 -> values (rows, k), ids (rows, k) int64: each row's k largest, best first, ids of equal
// values in ascending order. A row holding NaN gets NaN values (torch.topk ranks NaN first; the sampler's draw
// then refuses the row, as it would torch's).
std::vector<torch::Tensor> top_k(torch::Tensor logits, int64_t k) {
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 2 && logits.scalar_type() == torch::kFloat,
              "logits must be a CPU float32 (rows, vocabulary) tensor");
  const int64_t rows = logits.size(0), V = logits.size(1);
  TORCH_CHECK(k >= 1 && k <= V, "k = ", k, " must be in [1, ", V, "]");
  const torch::Tensor input = logits.contiguous();
  auto values = torch::empty({rows, k}, input.options());
  auto ids = torch::empty({rows, k}, input.options().dtype(torch::kLong));
  const float* in = input.data_ptr<float>();
  float* top = values.data_ptr<float>();
  int64_t* top_ids = ids.data_ptr<int64_t>();
  const int64_t blocks = (V + TOP_K_BLOCK - 1) / TOP_K_BLOCK;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> maxima(blocks), floors(blocks);
    std::vector<std::pair<float, int64_t>> candidates;
    for (int64_t r = begin; r < end; ++r) {
      const float* row = in + r * V;
      uint32_t nan = 0;
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t width = std::min(TOP_K_BLOCK, V - b * TOP_K_BLOCK);
        // a whole block with a fixed count, which the compiler vectorises
        const float* block = row + b * TOP_K_BLOCK;
        maxima[b] = width == TOP_K_BLOCK ? block_maximum(block, TOP_K_BLOCK, nan) : block_maximum(block, width, nan);
      }
      float* out = top + r * k;
      int64_t* out_ids = top_ids + r * k;
      if (nan) {
        write_nan_row(k, out, out_ids);
        continue;
      }
      candidates.clear();
      if (k >= blocks) {  // the floor would be the lowest maximum: every logit is a candidate
        for (int64_t j = 0; j < V; ++j) candidates.emplace_back(row[j], j);
      } else {
        const float floor = kth_largest(maxima, k, floors);
        for (int64_t b = 0; b < blocks; ++b)
          if (maxima[b] >= floor)
            for (int64_t j = b * TOP_K_BLOCK; j < std::min(V, (b + 1) * TOP_K_BLOCK); ++j)
              if (row[j] >= floor) candidates.emplace_back(row[j], j);
      }
      write_best(candidates, k, out, out_ids);
    }
  });
  return {values, ids};
}

// x (rows, K) fp32 times weight (V, K) fp32 -> each row's k largest products, as top_k returns them, from an
// approximation: `approx` (rows, V) bf16, oneDNN's product of x and the weight each rounded to bf16 (AVX512-BF16
// arithmetic, about twice the fp32 rate). Each approximate value a_j is within e_j of the exact w_j . x:
//   w_j . x - w'_j . x' = (w_j - w'_j) . x' + w_j . (x - x')   (', rounded to bf16), so at most d_j |x'| + n_j |x - x'|
//   (Cauchy-Schwarz; weight_norms holds d_j = |w_j - w'_j|, n_j = |w_j| and n'_j = |w'_j|, rounded up), plus the
//   rounding of the fp32 sum, gamma n'_j |x'| with gamma = K u32 / (1 - K u32), and the bf16 rounding of the
//   result, |a_j| u / (1 - u) with u = 2^-8; and 2 gamma n_j |x| for the rounding of an fp32 w_j . x (ours, or
//   another order's).
// The k-th largest lower bound a_j - e_j is a floor (k products reach it), found block by block as in top_k; only
// the outputs whose upper bound a_j + e_j reaches it are computed in fp32, then ranked. Each value is one fp32 dot
// product (in another order than panel_linear's; the bound allows for the rounding of both sums). With
// SmolLM2-135M's 49,152 outputs and k = 50, 84 outputs a row were computed in the median (187 at most).
std::vector<torch::Tensor> screened_top_k(torch::Tensor x, torch::Tensor weight, torch::Tensor weight_norms,
                                          torch::Tensor approx, int64_t k) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(),
              "x must be a contiguous CPU float32 (rows, in_features) tensor");
  const int64_t rows = x.size(0), K = x.size(1), V = weight.size(0);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == K && weight.scalar_type() == torch::kFloat &&
              weight.is_contiguous(), "weight must be a contiguous float32 (out_features, in_features) tensor");
  TORCH_CHECK(weight_norms.sizes() == torch::IntArrayRef({3, V}) && weight_norms.scalar_type() == torch::kFloat &&
              weight_norms.is_contiguous(), "weight_norms must be screening_norms(weight): (3, out_features) float32");
  TORCH_CHECK(approx.sizes() == torch::IntArrayRef({rows, V}) && approx.scalar_type() == torch::kBFloat16 &&
              approx.is_contiguous(), "approx must be a contiguous (rows, out_features) bf16 tensor");
  TORCH_CHECK(k >= 1 && k <= V, "k = ", k, " must be in [1, ", V, "]");
  constexpr double u = 1.0 / 256, u32 = 1.0 / (1 << 24);
  const double gamma = K * u32 / (1 - K * u32);
  const float result_rounding = float(u / (1 - u) * (1 + 1e-5));
  auto values = torch::empty({rows, k}, x.options());
  auto ids = torch::empty({rows, k}, x.options().dtype(torch::kLong));
  const float *in = x.data_ptr<float>(), *w = weight.data_ptr<float>(), *norms = weight_norms.data_ptr<float>();
  const c10::BFloat16* approximations = approx.data_ptr<c10::BFloat16>();
  const int64_t blocks = (V + TOP_K_BLOCK - 1) / TOP_K_BLOCK;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> errors(V), lower_maxima(blocks), upper_maxima(blocks), floors(blocks);
    std::vector<std::pair<float, int64_t>> candidates;
    for (int64_t r = begin; r < end; ++r) {
      const float* row = in + r * K;
      const c10::BFloat16* a = approximations + r * V;
      float* out = values.data_ptr<float>() + r * k;
      int64_t* out_ids = ids.data_ptr<int64_t>() + r * k;
      double squares = 0, rounded_squares = 0, rounding_squares = 0;
      uint32_t nan = 0;
      for (int64_t i = 0; i < K; ++i) {
        const double value = row[i], rounded = widen(c10::BFloat16(row[i]));
        squares += value * value, rounded_squares += rounded * rounded;
        rounding_squares += (value - rounded) * (value - rounded);
        uint32_t bits;
        std::memcpy(&bits, row + i, sizeof bits);
        nan |= (bits & 0x7f800000u) == 0x7f800000u;  // infinite or NaN
      }
      if (nan) {  // as top_k does for a row holding NaN: the sampler's draw refuses it
        write_nan_row(k, out, out_ids);
        continue;
      }
      // the coefficients of ErrorBound, each rounded up
      const double safety = 1 + 1e-5, rounded_length = std::sqrt(rounded_squares);
      const float A = float(rounded_length * safety);
      const float B = float((std::sqrt(rounding_squares) + 2 * gamma * std::sqrt(squares)) * safety);
      const float C = float(gamma * rounded_length * safety);
      const ErrorBound bound{A, B, C, result_rounding};
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t first = b * TOP_K_BLOCK, width = std::min(TOP_K_BLOCK, V - first);
        const float *d = norms + first, *n = norms + V + first, *n_rounded = norms + 2 * V + first;
        // a whole block with a fixed count, which the compiler vectorises
        const auto [low, high] = width == TOP_K_BLOCK
                                     ? bound.block(a + first, d, n, n_rounded, TOP_K_BLOCK, errors.data() + first)
                                     : bound.block(a + first, d, n, n_rounded, width, errors.data() + first);
        lower_maxima[b] = low, upper_maxima[b] = high;
      }
      const float floor = k >= blocks ? std::numeric_limits<float>::lowest() : kth_largest(lower_maxima, k, floors);
      candidates.clear();
      for (int64_t b = 0; b < blocks; ++b) {
        if (upper_maxima[b] < floor) continue;
        for (int64_t j = b * TOP_K_BLOCK; j < std::min(V, (b + 1) * TOP_K_BLOCK); ++j) {
          if (widen(a[j]) + errors[j] < floor) continue;
          float exact;
          weight_rows<float, 1, 1>(w + j * K, K, row, row, &exact, 1);
          candidates.emplace_back(exact, j);
        }
      }
      TORCH_CHECK(int64_t(candidates.size()) >= k, "screened_top_k: fewer candidates than k (a bound is wrong)");
      write_best(candidates, k, out, out_ids);
    }
  });
  return {values, ids};
}

// weight (out_features, in_features) fp32 -> panels (ceil(out_features / PANEL_COLUMNS), in_features, PANEL_COLUMNS):
// panels[p][k][c] = weight[p * PANEL_COLUMNS + c][k], zero past out_features.
torch::Tensor pack_panels(torch::Tensor weight) {
  TORCH_CHECK(weight.device().is_cpu() && weight.dim() == 2 && weight.scalar_type() == torch::kFloat,
              "weight must be a CPU float32 (out_features, in_features) tensor");
  const int64_t out_features = weight.size(0), K = weight.size(1);
  const int64_t panels = panel_count(out_features);
  auto padded = torch::zeros({panels * PANEL_COLUMNS, K}, weight.options());
  padded.narrow(0, 0, out_features).copy_(weight);
  return padded.view({panels, PANEL_COLUMNS, K}).transpose(1, 2).contiguous();
}

// x (rows, K) fp32 times the weight that `pack_panels` packed into `panels`, plus bias (out_features) and then
// residual (rows, out_features) when given: (rows, out_features), each output one fp32 sum over k in order.
torch::Tensor panel_linear(torch::Tensor x, torch::Tensor panels, int64_t out_features,
                           c10::optional<torch::Tensor> bias, c10::optional<torch::Tensor> residual) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.scalar_type() == torch::kFloat,
              "x must be a CPU float32 (rows, in_features) tensor");
  const int64_t rows = x.size(0), K = x.size(1);
  TORCH_CHECK(panels.dim() == 3 && panels.size(1) == K && panels.size(2) == PANEL_COLUMNS &&
              panels.scalar_type() == torch::kFloat && panels.is_contiguous() &&
              panels.size(0) == panel_count(out_features),
              "panels must be pack_panels' output for a (out_features, in_features) weight with x's in_features");
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_features && bias->scalar_type() == torch::kFloat,
                "bias must be (out_features,) float32");
  if (residual.has_value())
    TORCH_CHECK(residual->sizes() == torch::IntArrayRef({rows, out_features}) &&
                residual->scalar_type() == torch::kFloat, "residual must be (rows, out_features) float32");
  const torch::Tensor input = x.contiguous(), offsets = bias.has_value() ? bias->contiguous() : torch::Tensor();
  const torch::Tensor skip = residual.has_value() ? residual->contiguous() : torch::Tensor();
  auto out = torch::empty({rows, out_features}, x.options());
  const float *in = input.data_ptr<float>(), *weights = panels.data_ptr<float>();
  const float* added = offsets.defined() ? offsets.data_ptr<float>() : nullptr;
  const float* skipped = skip.defined() ? skip.data_ptr<float>() : nullptr;
  float* o = out.data_ptr<float>();
  // one task per panel: its weights come from memory once, for every row (the rows stay in the caches)
  at::parallel_for(0, panels.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t panel = begin; panel < end; ++panel) {
      const int64_t first_column = panel * PANEL_COLUMNS;
      const int64_t columns = std::min(PANEL_COLUMNS, out_features - first_column);
      const float* weight = weights + panel * K * PANEL_COLUMNS;
      const char* next = panel + 1 < end ? reinterpret_cast<const char*>(weight + K * PANEL_COLUMNS) : nullptr;
      for (int64_t row = 0, block = 0; row < rows; row += PANEL_ROWS, ++block) {
        // a panel is PANEL_LANES cache lines per k: the first row blocks each prefetch a part of the next one
        const bool prefetching = next && block < PANEL_LANES;
        const int64_t first = row * out_features + first_column;
        panel_rows_up_to(std::min(PANEL_ROWS, rows - row), in + row * K, K, weight,
                         added ? added + first_column : nullptr, skipped ? skipped + first : nullptr, o + first,
                         out_features, columns, prefetching ? next + block * K * 64 : nullptr);
      }
    }
  });
  return out;
}

// A product as the decoder hands it over: (weights, bias, out_features), the weights either a FusedLinear's
// unstacked (out_features_i, in_features) matrices, for small_linear, or one tensor of pack_panels' panels, for
// panel_linear (the caller chooses, see llama_decoder.kernel_product).
using Product = std::tuple<std::vector<torch::Tensor>, c10::optional<torch::Tensor>, int64_t>;

// x (rows, in_features) times `product`, plus residual (rows, out_features) when given.
torch::Tensor linear(torch::Tensor x, const Product& product, c10::optional<torch::Tensor> residual) {
  const auto& [weights, bias, out_features] = product;
  if (weights.size() == 1 && weights[0].dim() == 3) return panel_linear(x, weights[0], out_features, bias, residual);
  torch::Tensor out = small_linear(x, weights, bias);
  return residual.has_value() ? out.add_(*residual) : out;  // rounded after the product, as torch's two steps are
}

// One decoder layer over one new token per row, in one call: the ~30 operations that LlamaDecoder.forward
// dispatches one by one from Python cost ~100 us a layer there. hidden (rows, width); the norms as (weight, eps);
// the layer's products; cos, signed_sin (rows, 1, 1, head_dim) as `rotary` takes them; key_buffer, value_buffer
// (rows, kv_heads, capacity, head_dim), where the new key and value go to `position` and attention reads positions
// 0..position; mask (rows, position + 1) additive or none, prefix_rows and prefix as decode_attention takes them.
// The MLP's activation is SiLU. Returns the layer's output (rows, width) and the rotated queries (rows, heads,
// 1, head_dim), for an attention capture.
std::vector<torch::Tensor> decode_layer(torch::Tensor hidden, std::tuple<torch::Tensor, double> input_norm,
                                        std::tuple<torch::Tensor, double> post_attention_norm, const Product& qkv,
                                        const Product& out, const Product& gate_up, const Product& down,
                                        torch::Tensor cos, torch::Tensor signed_sin, torch::Tensor key_buffer,
                                        torch::Tensor value_buffer, int64_t position,
                                        c10::optional<torch::Tensor> mask, c10::optional<torch::Tensor> prefix_rows,
                                        int64_t prefix, double scale) {
  TORCH_CHECK(hidden.dim() == 2, "hidden must be (rows, width)");
  TORCH_CHECK(key_buffer.dim() == 4 && value_buffer.sizes() == key_buffer.sizes() &&
              key_buffer.size(0) == hidden.size(0) && position >= 0 && position < key_buffer.size(2),
              "key_buffer and value_buffer must be (rows, kv_heads, capacity, head_dim) with room at position");
  const int64_t rows = hidden.size(0), kv_heads = key_buffer.size(1), D = key_buffer.size(3);
  const torch::Tensor x = rms_norm(hidden, std::get<0>(input_norm), std::get<1>(input_norm));
  const torch::Tensor qkv_out = linear(x, qkv, c10::nullopt);
  const int64_t heads = qkv_out.size(1) / D - 2 * kv_heads;
  const torch::Tensor heads_out = qkv_out.view({rows, heads + 2 * kv_heads, 1, D});
  const torch::Tensor turned = rotary(heads_out.narrow(1, 0, heads + kv_heads), cos, signed_sin);
  key_buffer.select(2, position).copy_(turned.narrow(1, heads, kv_heads).squeeze(2));
  value_buffer.select(2, position).copy_(heads_out.narrow(1, heads + kv_heads, kv_heads).squeeze(2));
  const torch::Tensor query = turned.narrow(1, 0, heads);
  const torch::Tensor attended = decode_attention(query.view({rows, kv_heads, heads / kv_heads, D}),
                                                  key_buffer.narrow(2, 0, position + 1),
                                                  value_buffer.narrow(2, 0, position + 1), mask, prefix_rows, prefix,
                                                  scale);
  hidden = linear(attended.view({rows, heads * D}), out, hidden);
  const torch::Tensor normed = rms_norm(hidden, std::get<0>(post_attention_norm), std::get<1>(post_attention_norm));
  hidden = linear(silu_mul(linear(normed, gate_up, c10::nullopt)), down, hidden);
  return {hidden, query};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("decode_attention", &decode_attention, "One-token attention over a KV cache (see the source).");
  module.def("rms_norm", &rms_norm, "transformers' LlamaRMSNorm (see the source).");
  module.def("small_linear", &small_linear, "A linear layer for one or two rows (see the source).");
  module.def("rotary", &rotary, "transformers' rotary embedding in one pass (see the source).");
  module.def("silu_mul", &silu_mul, "silu(gate) * up in one pass (see the source).");
  module.def("top_k", &top_k, "Each row's k largest logits and their ids (see the source).");
  module.def("screened_top_k", &screened_top_k, "top_k of an fp32 product, screened by its bf16 one (see the source).");
  module.def("pack_panels", &pack_panels, "An fp32 weight in panel_linear's layout (see the source).");
  module.def("panel_linear", &panel_linear, "An fp32 linear layer from pack_panels' layout (see the source).");
  module.def("linear", &linear, "small_linear or panel_linear, as the product given says (see the source).");
  module.def("decode_layer", &decode_layer, "One decoder layer over one new token per row (see the source).");
#if defined(LAB_AVX512) && defined(__AVX512BF16__)
  module.attr("avx512_bf16") = true;
#else
  module.attr("avx512_bf16") = false;
#endif
#ifdef LAB_AVX512
  module.attr("avx512") = true;
#else
  module.attr("avx512") = false;
#endif
}
