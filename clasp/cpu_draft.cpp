// One draft token of a Llama-family model in a single call, on CPU, over weight-only int8 matrices.
//
// The Python draft path spends ~12 ms per token on the embedded model, of which ~6 ms is weight
// streaming; the rest is per-op overhead (121 dynamic-quantization calls at ~17 us each, ~400
// small torch ops). Here the whole token is one call: the same arithmetic as the Python path
// (RMSNorm, fused QKV with rotary, attention over the KV cache, SiLU-gated MLP, int8 lm_head),
// activations quantized per tensor to asymmetric uint8 like fbgemm's dynamic quantization, and
// int8 products in one of three instruction sets, chosen by the caller (clasp/cpu_draft.py
// times them at load): AVX-512 VNNI (vpdpbusd), AVX2 (bytes widened to 16 bits, vpmaddwd) or
// portable loops. All three compute the same exact integer dot products (no saturating
// 16-bit sums, unlike vpmaddubsw), so they differ in speed only.
// The draft only proposes tokens: the full fp32 model verifies them, so this changes speed and
// acceptance, never the output. See docs/performance.md.
//
// Fp32Matrix is the fp32 counterpart for the full model's few-row products (decoding: 1 row,
// verification: a few): x[T, K] @ W[N, K].T with the weights streamed once for all T rows, in
// AVX-512F, AVX2+FMA or portable code (all plain fp32 multiply-adds; they differ in speed only).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <utility>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
#define AVX2_TARGET __attribute__((target("avx2,fma")))
#define AVX512_TARGET __attribute__((target("avx512f")))

// The instruction sets the kernel has code for (the Python side names them in cpu_draft.ISAS and
// cpu_draft.FP32_ISAS): the int8 products have portable, AVX2 and AVX-512 VNNI code, the fp32
// products portable, AVX2 (with FMA) and AVX-512F code.
enum Isa : int64_t { ISA_PORTABLE = 0, ISA_AVX2 = 1, ISA_AVX512_VNNI = 2, ISA_AVX512 = 3 };

bool cpu_supports(int64_t isa) {
  __builtin_cpu_init();
  switch (isa) {
    case ISA_PORTABLE:
      return true;
    case ISA_AVX2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case ISA_AVX512_VNNI:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    case ISA_AVX512:
      return __builtin_cpu_supports("avx512f");
    default:
      return false;
  }
}

// An int8 instruction set (ISA_PORTABLE, ISA_AVX2, ISA_AVX512_VNNI) this CPU can run.
int64_t checked_isa(int64_t isa, const char* name) {
  TORCH_CHECK(isa >= ISA_PORTABLE && isa <= ISA_AVX512_VNNI, name, ": unknown instruction set ", isa);
  TORCH_CHECK(cpu_supports(isa), name, ": this CPU cannot run instruction set ", isa);
  return isa;
}

// An fp32 instruction set (ISA_PORTABLE, ISA_AVX2, ISA_AVX512) this CPU can run.
int64_t checked_fp32_isa(int64_t isa, const char* name) {
  TORCH_CHECK(isa == ISA_PORTABLE || isa == ISA_AVX2 || isa == ISA_AVX512, name, ": unknown fp32 instruction set ",
              isa);
  TORCH_CHECK(cpu_supports(isa), name, ": this CPU cannot run instruction set ", isa);
  return isa;
}

// ------------------------------------------------------------------ activations
struct QuantizedRow {
  std::vector<uint8_t> data;
  std::vector<int16_t> wide;  // the same values as 16-bit integers, for the AVX2 products
  float scale = 1.f;
  int32_t zero = 0;
};

// Asymmetric per-tensor uint8 over [min(x, 0), max(x, 0)], as fbgemm's dynamic quantization.
void quantize(const float* x, int64_t n, QuantizedRow& out) {
  float lo = 0.f, hi = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
  }
  float scale = (hi - lo) / 255.f;
  if (!(scale > 0.f) || !std::isfinite(scale)) scale = 1.f;
  const int32_t zero = std::clamp(static_cast<int32_t>(std::nearbyint(-lo / scale)), 0, 255);
  const float inv = 1.f / scale;
  const int64_t padded = (n + 3) / 4 * 4;  // the weights' blocks of 4 inputs (zero weights there)
  out.data.assign(padded, 0);
  out.wide.assign(padded, 0);
  for (int64_t i = 0; i < n; ++i) {
    const int32_t v = std::clamp(static_cast<int32_t>(std::nearbyint(x[i] * inv)) + zero, 0, 255);
    out.data[i] = static_cast<uint8_t>(v);
    out.wide[i] = static_cast<int16_t>(v);
  }
  out.scale = scale;
  out.zero = zero;
}

// ------------------------------------------------------------------ int8 matrix-vector products
// Weights are blocked [ceil(N/16), ceil(K/4), 16, 4]: each 64-byte line holds 4 consecutive inputs
// of 16 output rows, so one vpdpbusd with the 4 activations broadcast accumulates 16 outputs, and
// each thread streams one contiguous range (36 GB/s on the dev CPU against 21 GB/s for four
// row-major rows at a time). Padding rows and inputs are zero.
struct Int8Matrix {
  torch::Tensor blocked;  // int8 [ceil(N/16), ceil(K/4), 16, 4]
  torch::Tensor scale;    // float32 [N]: w ~= q * scale (per output channel)
  torch::Tensor rowsum;   // int32 [N]: sum_k q[n, k], for the activations' zero point
  torch::Tensor bias;     // float32 [N] or undefined
  int64_t n = 0, k = 0, k_pad = 0;
  int64_t isa = ISA_PORTABLE;  // which code computes the products (Isa)

  torch::Tensor forward(const torch::Tensor& x) const;  // x [T, K] float32 -> [T, N]
};

Int8Matrix make_matrix(const torch::Tensor& blocked, const torch::Tensor& scale, const torch::Tensor& rowsum,
                       int64_t n, int64_t k, const c10::optional<torch::Tensor>& bias, int64_t isa,
                       const char* name = "int8 matrix") {
  TORCH_CHECK(n > 0 && k > 0, name, ": empty matrix");
  TORCH_CHECK(blocked.scalar_type() == torch::kInt8 && blocked.is_contiguous() && blocked.dim() == 4 &&
              blocked.size(0) == (n + 15) / 16 && blocked.size(1) == (k + 3) / 4 && blocked.size(2) == 16 &&
              blocked.size(3) == 4, name, ": expected a contiguous int8 tensor [ceil(N/16), ceil(K/4), 16, 4]");
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == n && scale.scalar_type() == torch::kFloat32 && scale.is_contiguous(),
              name, ": expected one float32 scale per row");
  TORCH_CHECK(rowsum.dim() == 1 && rowsum.size(0) == n && rowsum.scalar_type() == torch::kInt32 &&
              rowsum.is_contiguous(), name, ": expected one int32 row sum per row");
  Int8Matrix m;
  m.blocked = blocked;
  m.scale = scale;
  m.rowsum = rowsum;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, name, ": bias has the wrong size");
    m.bias = bias->to(torch::kFloat32).contiguous();
  }
  m.n = n;
  m.k = k;
  m.k_pad = blocked.size(1) * 4;
  m.isa = checked_isa(isa, name);
  return m;
}

// Rows [16 * b, 16 * b + 16) from their 16 integer dot products.
inline void finish_block(const Int8Matrix& m, const QuantizedRow& x, int64_t b, const int32_t* dots, float* y) {
  const float* scale = m.scale.data_ptr<float>();
  const int32_t* rowsum = m.rowsum.data_ptr<int32_t>();
  const float* bias = m.bias.defined() ? m.bias.data_ptr<float>() : nullptr;
  const int64_t end = std::min<int64_t>(16, m.n - b * 16);
  for (int64_t r = 0; r < end; ++r) {
    const int64_t row = b * 16 + r;
    const float v = scale[row] * x.scale * static_cast<float>(dots[r] - x.zero * rowsum[row]);
    y[row] = bias ? v + bias[row] : v;
  }
}

void gemv_blocks_generic(const Int8Matrix& m, const QuantizedRow& x, int64_t b0, int64_t b1, float* y) {
  const uint8_t* xq = x.data.data();
  const int64_t groups = m.k_pad / 4;
  for (int64_t b = b0; b < b1; ++b) {
    const int8_t* w = m.blocked.data_ptr<int8_t>() + b * groups * 64;
    int32_t dots[16] = {0};
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t r = 0; r < 16; ++r)
        for (int64_t j = 0; j < 4; ++j)
          dots[r] += static_cast<int32_t>(xq[g * 4 + j]) * static_cast<int32_t>(w[(g * 16 + r) * 4 + j]);
    finish_block(m, x, b, dots, y);
  }
}

VNNI_TARGET void gemv_blocks_vnni(const Int8Matrix& m, const QuantizedRow& x, int64_t b0, int64_t b1, float* y) {
  const uint8_t* xq = x.data.data();
  const int64_t groups = m.k_pad / 4;
  for (int64_t b = b0; b < b1; ++b) {
    const int8_t* w = m.blocked.data_ptr<int8_t>() + b * groups * 64;
    // four independent accumulators hide vpdpbusd's latency
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    int64_t g = 0;
    for (; g + 4 <= groups; g += 4) {
      const int32_t* xg = reinterpret_cast<const int32_t*>(xq + g * 4);
      a0 = _mm512_dpbusd_epi32(a0, _mm512_set1_epi32(xg[0]), _mm512_loadu_si512(w + g * 64));
      a1 = _mm512_dpbusd_epi32(a1, _mm512_set1_epi32(xg[1]), _mm512_loadu_si512(w + g * 64 + 64));
      a2 = _mm512_dpbusd_epi32(a2, _mm512_set1_epi32(xg[2]), _mm512_loadu_si512(w + g * 64 + 128));
      a3 = _mm512_dpbusd_epi32(a3, _mm512_set1_epi32(xg[3]), _mm512_loadu_si512(w + g * 64 + 192));
    }
    for (; g < groups; ++g) {
      a0 = _mm512_dpbusd_epi32(a0, _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(xq + g * 4)),
                               _mm512_loadu_si512(w + g * 64));
    }
    alignas(64) int32_t dots[16];
    _mm512_store_si512(dots, _mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3)));
    finish_block(m, x, b, dots, y);
  }
}

// The same 16-row blocks with AVX2: each 16-byte quarter of a line (4 rows x 4 inputs) is widened
// to 16-bit and multiplied by the 4 activations (as 16-bit, repeated) with vpmaddwd, which sums
// pairs into 32 bits without saturating; so each row collects two partial sums, added at the end.
AVX2_TARGET void gemv_blocks_avx2(const Int8Matrix& m, const QuantizedRow& x, int64_t b0, int64_t b1, float* y) {
  const int16_t* xw = x.wide.data();
  const int64_t groups = m.k_pad / 4;
  const __m256i order = _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7);
  for (int64_t b = b0; b < b1; ++b) {
    const int8_t* w = m.blocked.data_ptr<int8_t>() + b * groups * 64;
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;  // rows 0-3, 4-7, 8-11, 12-15
    for (int64_t g = 0; g < groups; ++g) {
      const __m256i xg = _mm256_broadcastq_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(xw + g * 4)));
      const int8_t* line = w + g * 64;
      a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(
          _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(line))), xg));
      a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(
          _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(line + 16))), xg));
      a2 = _mm256_add_epi32(a2, _mm256_madd_epi16(
          _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(line + 32))), xg));
      a3 = _mm256_add_epi32(a3, _mm256_madd_epi16(
          _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(line + 48))), xg));
    }
    // hadd gives [r0 r1 r4 r5 | r2 r3 r6 r7]; the permutation puts the rows in order
    alignas(32) int32_t dots[16];
    _mm256_store_si256(reinterpret_cast<__m256i*>(dots), _mm256_permutevar8x32_epi32(_mm256_hadd_epi32(a0, a1), order));
    _mm256_store_si256(reinterpret_cast<__m256i*>(dots + 8),
                       _mm256_permutevar8x32_epi32(_mm256_hadd_epi32(a2, a3), order));
    finish_block(m, x, b, dots, y);
  }
}

// y[N] = dequantized (W @ x) (+ bias), 16-row blocks split across torch's intra-op threads.
void gemv(const Int8Matrix& m, const QuantizedRow& x, float* y) {
  TORCH_CHECK(static_cast<int64_t>(x.data.size()) >= m.k_pad, "int8 product: input width ", x.data.size(),
              " < matrix width ", m.k_pad);
  at::parallel_for(0, m.blocked.size(0), 4, [&](int64_t b0, int64_t b1) {
    switch (m.isa) {
      case ISA_AVX512_VNNI:
        gemv_blocks_vnni(m, x, b0, b1, y);
        break;
      case ISA_AVX2:
        gemv_blocks_avx2(m, x, b0, b1, y);
        break;
      default:
        gemv_blocks_generic(m, x, b0, b1, y);
    }
  });
}

// y[T, N] for T quantized rows: each 16-row block of W is read from memory once and used for every
// row while it is in cache (a batch's draft tokens share one pass over the weights).
void gemv_rows(const Int8Matrix& m, const std::vector<QuantizedRow>& xs, float* y) {
  for (const QuantizedRow& x : xs)
    TORCH_CHECK(static_cast<int64_t>(x.data.size()) >= m.k_pad, "int8 product: input width ", x.data.size(),
                " < matrix width ", m.k_pad);
  const int64_t rows = static_cast<int64_t>(xs.size());
  at::parallel_for(0, m.blocked.size(0), 4, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t t = 0; t < rows; ++t) {
        switch (m.isa) {
          case ISA_AVX512_VNNI:
            gemv_blocks_vnni(m, xs[t], b, b + 1, y + t * m.n);
            break;
          case ISA_AVX2:
            gemv_blocks_avx2(m, xs[t], b, b + 1, y + t * m.n);
            break;
          default:
            gemv_blocks_generic(m, xs[t], b, b + 1, y + t * m.n);
        }
      }
    }
  });
}

torch::Tensor Int8Matrix::forward(const torch::Tensor& x) const {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k && x.scalar_type() == torch::kFloat32 && x.device().is_cpu(),
              "int8 product: expected float32 CPU input [T, ", k, "]");
  const torch::Tensor xc = x.contiguous();
  const int64_t rows = x.size(0);
  auto out = torch::empty({rows, n}, torch::kFloat32);
  std::vector<QuantizedRow> xq(rows);
  for (int64_t t = 0; t < rows; ++t) quantize(xc.data_ptr<float>() + t * k, k, xq[t]);  // per row, as in the draft
  gemv_rows(*this, xq, out.data_ptr<float>());
  return out;
}

// ------------------------------------------------------------------ fp32 few-row products
// Weights are blocked [ceil(N/16), K, 16]: each 64-byte line holds one input of 16 output rows,
// so for T input rows one line loaded feeds T multiply-adds (the input broadcast), and 16 x T
// accumulators cover a block's whole product with no horizontal sums. Each thread streams one
// contiguous range of blocks, and every weight line is read from memory once for all T rows (up to
// FP32_MAX_ROWS; more rows are done in passes of that many): rows beyond what the registers hold
// re-read a block from cache. Padding rows are zero.
constexpr int64_t FP32_MAX_ROWS = 64;
constexpr int64_t FP32_AVX2_ROWS = 6;  // AVX2: 6 rows x 2 halves of a line = 12 of 16 ymm registers
constexpr int64_t FP32_K_TILE = 256;   // AVX2 passes over more rows re-read a 16 KiB tile from L1
// Lines requested into L2 this far ahead of use (8 KiB): more misses in flight than the hardware
// prefetcher keeps, which stops at 4 KiB page boundaries (measured: docs/performance.md, "Beside
// llama.cpp").
constexpr int64_t FP32_PREFETCH_LINES = 128;

inline void prefetch_line(const float* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T1); }

struct Fp32Matrix {
  torch::Tensor blocked;  // float32 [ceil(N/16), K, 16]
  torch::Tensor bias;     // float32 [N] or undefined
  int64_t n = 0, k = 0;
  int64_t isa = ISA_PORTABLE;  // which code computes the products (Isa: portable, AVX2, AVX-512F)

  torch::Tensor forward(const torch::Tensor& x) const;  // x [T, K] float32 -> [T, N]
};

Fp32Matrix make_fp32_matrix(const torch::Tensor& blocked, int64_t n, int64_t k,
                            const c10::optional<torch::Tensor>& bias, int64_t isa,
                            const char* name = "fp32 matrix") {
  TORCH_CHECK(n > 0 && k > 0, name, ": empty matrix");
  TORCH_CHECK(blocked.scalar_type() == torch::kFloat32 && blocked.is_contiguous() && blocked.dim() == 3 &&
              blocked.size(0) == (n + 15) / 16 && blocked.size(1) == k && blocked.size(2) == 16 &&
              blocked.device().is_cpu(),
              name, ": expected a contiguous float32 CPU tensor [ceil(N/16), K, 16]");
  Fp32Matrix m;
  m.blocked = blocked;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, name, ": bias has the wrong size");
    m.bias = bias->to(torch::kFloat32).contiguous();
  }
  m.n = n;
  m.k = k;
  m.isa = checked_fp32_isa(isa, name);
  return m;
}

// Inputs transposed, xt[k][T] for T rows: the T values a weight line meets sit in one cache line.
// Block b's 16 x T sums (acc[t][r]) -> y[t, 16 b + r] (+ bias), padding rows dropped.
inline void finish_fp32_block(const Fp32Matrix& m, int64_t b, int64_t T, const float* acc, float* y,
                              int64_t ldy) {
  const float* bias = m.bias.defined() ? m.bias.data_ptr<float>() : nullptr;
  const int64_t end = std::min<int64_t>(16, m.n - b * 16);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t r = 0; r < end; ++r) {
      const int64_t row = b * 16 + r;
      y[t * ldy + row] = bias ? acc[t * 16 + r] + bias[row] : acc[t * 16 + r];
    }
}

void fp32_blocks_generic(const Fp32Matrix& m, const float* xt, int64_t T, int64_t b0, int64_t b1, float* y,
                         int64_t ldy) {
  const int64_t k = m.k;
  std::vector<float> acc(16 * T);
  for (int64_t b = b0; b < b1; ++b) {
    const float* w = m.blocked.data_ptr<float>() + b * k * 16;
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t i = 0; i < k; ++i)
      for (int64_t t = 0; t < T; ++t) {
        const float xv = xt[i * T + t];
        for (int64_t r = 0; r < 16; ++r) acc[t * 16 + r] += w[i * 16 + r] * xv;
      }
    finish_fp32_block(m, b, T, acc.data(), y, ldy);
  }
}

// A tile: TG rows (t0..) of NB adjacent blocks (16 NB outputs) over inputs [i0, i1), adding to
// the sums acc[t][32] (block nb at nb * 16; zero first where i0 == 0). Each input's NB lines are
// loaded once for the TG rows, so a row's broadcast input feeds NB multiply-adds (with NB = 2,
// half the loads per multiply-add of one block); U sets of accumulators over alternate inputs
// where few rows leave too few independent chains to hide the FMA latency. U is fixed by the
// pass's row count (not the tile's), and a row's sums run over the inputs in order however the
// pass is tiled, so they do not depend on the tiling.
template <int TG, int U, int NB>
AVX512_TARGET void fp32_tile_avx512(const float* w, int64_t k, const float* xt, int64_t T, int64_t t0, int64_t i0,
                                    int64_t i1, float* acc_io, bool prefetch) {
  __m512 acc[U][NB][TG];
  for (int u = 0; u < U; ++u)
    for (int nb = 0; nb < NB; ++nb)
      for (int t = 0; t < TG; ++t)
        acc[u][nb][t] = u == 0 && i0 > 0 ? _mm512_load_ps(acc_io + t * 32 + nb * 16) : _mm512_setzero_ps();
  const int64_t stride = k * 16;  // floats from one block to the next
  int64_t i = i0;
  for (; i + U <= i1; i += U) {
    if (prefetch)  // the first tile of an input range streams it from memory; later ones read it from L1
      for (int u = 0; u < U; ++u)
        for (int nb = 0; nb < NB; ++nb) prefetch_line(w + nb * stride + (i + u + FP32_PREFETCH_LINES) * 16);
    for (int u = 0; u < U; ++u) {
      __m512 line[NB];
      for (int nb = 0; nb < NB; ++nb) line[nb] = _mm512_loadu_ps(w + nb * stride + (i + u) * 16);
      const float* xi = xt + (i + u) * T + t0;
      for (int t = 0; t < TG; ++t) {
        const __m512 xv = _mm512_set1_ps(xi[t]);
        for (int nb = 0; nb < NB; ++nb) acc[u][nb][t] = _mm512_fmadd_ps(line[nb], xv, acc[u][nb][t]);
      }
    }
  }
  for (; i < i1; ++i)
    for (int nb = 0; nb < NB; ++nb) {
      const __m512 line = _mm512_loadu_ps(w + nb * stride + i * 16);
      for (int t = 0; t < TG; ++t)
        acc[0][nb][t] = _mm512_fmadd_ps(line, _mm512_set1_ps(xt[i * T + t0 + t]), acc[0][nb][t]);
    }
  for (int nb = 0; nb < NB; ++nb)
    for (int t = 0; t < TG; ++t) {
      __m512 sum = acc[0][nb][t];
      for (int u = 1; u < U; ++u) sum = _mm512_add_ps(sum, acc[u][nb][t]);
      _mm512_store_ps(acc_io + t * 32 + nb * 16, sum);
    }
}

// Rows per AVX-512 tile: 2 x 14 accumulators and 2 lines fill 30 of the 32 zmm registers.
constexpr int FP32_AVX512_TILE_ROWS = 14;
// With more rows than one tile: inputs per range, whose lines (2 x 64 x 64 bytes) the later row
// tiles re-read from L1 while the first one's prefetches bring the next range from memory.
constexpr int64_t FP32_AVX512_K_TILE = 64;
using Fp32TileFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, int64_t, int64_t, float*, bool);

template <int U, int NB, size_t... I>
constexpr std::array<Fp32TileFn, sizeof...(I)> fp32_tiles(std::index_sequence<I...>) {
  return {fp32_tile_avx512<int(I) + 1, U, NB>...};
}

// Blocks [b0, b1) for all T rows: up to 16 rows, a block at a time in one tile over all inputs;
// more, a pair of blocks at a time, per range of inputs, in row tiles of equal size.
AVX512_TARGET void fp32_blocks_avx512(const Fp32Matrix& m, const float* xt, int64_t T, int64_t b0, int64_t b1,
                                      float* y, int64_t ldy) {
  static constexpr auto one_u1 = fp32_tiles<1, 1>(std::make_index_sequence<FP32_AVX512_TILE_ROWS>());
  static constexpr auto two_u1 = fp32_tiles<1, 2>(std::make_index_sequence<FP32_AVX512_TILE_ROWS>());
  const int64_t k = m.k;
  const float* bias = m.bias.defined() ? m.bias.data_ptr<float>() : nullptr;
  // Up to 16 rows: one block at a time, all rows in one tile (up to 16 accumulators and a line;
  // pairs measured no faster there).
  const bool single = T <= 16;
  const int64_t tiles = single ? 1 : (T + FP32_AVX512_TILE_ROWS - 1) / FP32_AVX512_TILE_ROWS;
  const int64_t per_tile = (T + tiles - 1) / tiles;
  const int64_t range = tiles == 1 ? k : FP32_AVX512_K_TILE;
  alignas(64) float acc[FP32_MAX_ROWS * 32];
  for (int64_t b = b0; b < b1; b += (single ? 1 : 2)) {
    const int nb = b + 1 < b1 && !single ? 2 : 1;
    const float* w = m.blocked.data_ptr<float>() + b * k * 16;
    for (int64_t i0 = 0; i0 < k; i0 += range) {
      const int64_t i1 = std::min(k, i0 + range);
      for (int64_t t0 = 0; t0 < T; t0 += per_tile) {
        const int64_t tg = std::min(per_tile, T - t0);
        float* a = acc + t0 * 32;
        const bool prefetch = t0 == 0;
        if (!single)
          (nb == 2 ? two_u1 : one_u1)[tg - 1](w, k, xt, T, t0, i0, i1, a, prefetch);
        else if (T == 1)  // one row: 4 chains; 2-3 rows: 2 (the pass's row count decides)
          fp32_tile_avx512<1, 4, 1>(w, k, xt, T, t0, i0, i1, a, prefetch);
        else if (T == 2)
          fp32_tile_avx512<2, 2, 1>(w, k, xt, T, t0, i0, i1, a, prefetch);
        else if (T == 3)
          fp32_tile_avx512<3, 2, 1>(w, k, xt, T, t0, i0, i1, a, prefetch);
        else if (T == 15)
          fp32_tile_avx512<15, 1, 1>(w, k, xt, T, t0, i0, i1, a, prefetch);
        else if (T == 16)
          fp32_tile_avx512<16, 1, 1>(w, k, xt, T, t0, i0, i1, a, prefetch);
        else
          one_u1[T - 1](w, k, xt, T, t0, i0, i1, a, prefetch);
      }
    }
    for (int j = 0; j < nb; ++j) {
      const int64_t end = std::min<int64_t>(16, m.n - (b + j) * 16);
      for (int64_t t = 0; t < T; ++t)
        for (int64_t r = 0; r < end; ++r) {
          const int64_t row = (b + j) * 16 + r;
          const float v = acc[t * 32 + j * 16 + r];
          y[t * ldy + row] = bias ? v + bias[row] : v;
        }
    }
  }
}

// AVX2: a line is two 8-float halves. TC (<= FP32_AVX2_ROWS) rows t0.. over inputs [i0, i1),
// adding to the partial sums acc[t][16] (so a block's rows can be done in several passes).
template <int TC>
AVX2_TARGET inline void fp32_tile_avx2(const float* w, const float* xt, int64_t T, int64_t t0, int64_t i0,
                                       int64_t i1, float* acc, bool prefetch) {
  constexpr int U = TC == 1 ? 2 : 1;  // with one row, two sets of accumulators: 4 chains in flight
  __m256 lo[U][TC], hi[U][TC];
  for (int t = 0; t < TC; ++t) {
    lo[0][t] = _mm256_loadu_ps(acc + (t0 + t) * 16);
    hi[0][t] = _mm256_loadu_ps(acc + (t0 + t) * 16 + 8);
    for (int u = 1; u < U; ++u) lo[u][t] = hi[u][t] = _mm256_setzero_ps();
  }
  int64_t i = i0;
  for (; i + U <= i1; i += U) {
    if (prefetch)
      for (int u = 0; u < U; ++u) prefetch_line(w + (i + u + FP32_PREFETCH_LINES) * 16);
    for (int u = 0; u < U; ++u) {
      const __m256 wl = _mm256_loadu_ps(w + (i + u) * 16);
      const __m256 wh = _mm256_loadu_ps(w + (i + u) * 16 + 8);
      const float* xi = xt + (i + u) * T + t0;
      for (int t = 0; t < TC; ++t) {
        const __m256 xv = _mm256_broadcast_ss(xi + t);
        lo[u][t] = _mm256_fmadd_ps(wl, xv, lo[u][t]);
        hi[u][t] = _mm256_fmadd_ps(wh, xv, hi[u][t]);
      }
    }
  }
  for (; i < i1; ++i) {
    const __m256 wl = _mm256_loadu_ps(w + i * 16);
    const __m256 wh = _mm256_loadu_ps(w + i * 16 + 8);
    for (int t = 0; t < TC; ++t) {
      const __m256 xv = _mm256_broadcast_ss(xt + i * T + t0 + t);
      lo[0][t] = _mm256_fmadd_ps(wl, xv, lo[0][t]);
      hi[0][t] = _mm256_fmadd_ps(wh, xv, hi[0][t]);
    }
  }
  for (int t = 0; t < TC; ++t) {
    for (int u = 1; u < U; ++u) {
      lo[0][t] = _mm256_add_ps(lo[0][t], lo[u][t]);
      hi[0][t] = _mm256_add_ps(hi[0][t], hi[u][t]);
    }
    _mm256_storeu_ps(acc + (t0 + t) * 16, lo[0][t]);
    _mm256_storeu_ps(acc + (t0 + t) * 16 + 8, hi[0][t]);
  }
}

AVX2_TARGET void fp32_tile_avx2_rows(const float* w, const float* xt, int64_t T, int64_t t0, int64_t tc, int64_t i0,
                                     int64_t i1, float* acc) {
  const bool prefetch = t0 == 0;  // later passes over the tile read it from L1
  switch (tc) {
    case 1: fp32_tile_avx2<1>(w, xt, T, t0, i0, i1, acc, prefetch); break;
    case 2: fp32_tile_avx2<2>(w, xt, T, t0, i0, i1, acc, prefetch); break;
    case 3: fp32_tile_avx2<3>(w, xt, T, t0, i0, i1, acc, prefetch); break;
    case 4: fp32_tile_avx2<4>(w, xt, T, t0, i0, i1, acc, prefetch); break;
    case 5: fp32_tile_avx2<5>(w, xt, T, t0, i0, i1, acc, prefetch); break;
    default: fp32_tile_avx2<6>(w, xt, T, t0, i0, i1, acc, prefetch); break;
  }
}

// Up to FP32_AVX2_ROWS rows: one pass over the block. More: per tile of FP32_K_TILE inputs, a pass
// per group of rows; the first brings the tile from memory, the others read it from L1.
AVX2_TARGET void fp32_blocks_avx2(const Fp32Matrix& m, const float* xt, int64_t T, int64_t b0, int64_t b1, float* y,
                                  int64_t ldy) {
  const int64_t k = m.k;
  const int64_t tile = T <= FP32_AVX2_ROWS ? k : FP32_K_TILE;
  alignas(32) float acc[16 * FP32_MAX_ROWS];
  for (int64_t b = b0; b < b1; ++b) {
    const float* w = m.blocked.data_ptr<float>() + b * k * 16;
    std::fill(acc, acc + 16 * T, 0.f);
    for (int64_t i0 = 0; i0 < k; i0 += tile) {
      const int64_t i1 = std::min(k, i0 + tile);
      for (int64_t t0 = 0; t0 < T; t0 += FP32_AVX2_ROWS)
        fp32_tile_avx2_rows(w, xt, T, t0, std::min(FP32_AVX2_ROWS, T - t0), i0, i1, acc);
    }
    finish_fp32_block(m, b, T, acc, y, ldy);
  }
}

// y[T, N] (row stride ldy) = x @ W.T (+ bias) for T <= FP32_MAX_ROWS rows given transposed as
// xt[K][T]; 16-row blocks split across torch's intra-op threads.
void fp32_product(const Fp32Matrix& m, const float* xt, int64_t T, float* y, int64_t ldy) {
  TORCH_CHECK(T >= 1 && T <= FP32_MAX_ROWS, "fp32 product: ", T, " rows per pass");
  at::parallel_for(0, m.blocked.size(0), 4, [&](int64_t b0, int64_t b1) {
    switch (m.isa) {
      case ISA_AVX512:
        fp32_blocks_avx512(m, xt, T, b0, b1, y, ldy);
        break;
      case ISA_AVX2:
        fp32_blocks_avx2(m, xt, T, b0, b1, y, ldy);
        break;
      default:
        fp32_blocks_generic(m, xt, T, b0, b1, y, ldy);
    }
  });
}

torch::Tensor Fp32Matrix::forward(const torch::Tensor& x) const {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k && x.scalar_type() == torch::kFloat32 && x.device().is_cpu(),
              "fp32 product: expected float32 CPU input [T, ", k, "]");
  const int64_t rows = x.size(0);
  auto out = torch::empty({rows, n}, torch::kFloat32);
  if (rows == 0) return out;
  const torch::Tensor xc = x.contiguous();
  std::vector<float> xt(k * std::min(rows, FP32_MAX_ROWS));
  for (int64_t t0 = 0; t0 < rows; t0 += FP32_MAX_ROWS) {  // passes of up to FP32_MAX_ROWS rows
    const int64_t T = std::min(FP32_MAX_ROWS, rows - t0);
    const float* xs = xc.data_ptr<float>() + t0 * k;
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < k; ++i) xt[i * T + t] = xs[t * k + i];
    fp32_product(*this, xt.data(), T, out.data_ptr<float>() + t0 * n, n);
  }
  return out;
}

// ------------------------------------------------------------------ float helpers
void rms_norm(const float* x, const float* weight, int64_t n, float eps, float* out) {
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(x[i]) * x[i];
  const float inv = 1.f / std::sqrt(static_cast<float>(sum / n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * inv * weight[i];
}

// exp on 16 lanes: range reduction by ln 2, degree-6 polynomial, scale by 2^n (rel. error ~1e-7).
AVX512_TARGET inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 720.f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// out[i] = silu(gate[i]) * up[i]
AVX512_TARGET void silu_mul_avx512(const float* gate, const float* up, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 g = _mm512_loadu_ps(gate + i);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
    const __m512 s = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), e));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(s, _mm512_loadu_ps(up + i)));
  }
  for (; i < n; ++i) out[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
}

void silu_mul_generic(const float* gate, const float* up, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
}

AVX512_TARGET inline float dot_avx512(const float* a, const float* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  float s = _mm512_reduce_add_ps(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

AVX512_TARGET inline void axpy_avx512(float alpha, const float* x, float* y, int64_t n) {
  const __m512 a = _mm512_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(a, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += alpha * x[i];
}

// One head's attention over keys/values [P, hd]: out = softmax(q . K^T * scale) V.
// scores[p] = exp(scores[p] - mx) for p < P; returns their sum (a softmax's denominator).
AVX512_TARGET inline float exp_shifted_avx512(float* scores, int64_t P, float mx) {
  __m512 total = _mm512_setzero_ps();
  const __m512 m = _mm512_set1_ps(mx);
  int64_t p = 0;
  for (; p + 16 <= P; p += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(scores + p), m));
    _mm512_storeu_ps(scores + p, e);
    total = _mm512_add_ps(total, e);
  }
  float sum = _mm512_reduce_add_ps(total);
  for (; p < P; ++p) {
    scores[p] = std::exp(scores[p] - mx);
    sum += scores[p];
  }
  return sum;
}

AVX512_TARGET void attend_avx512(const float* q, const float* keys, const float* values, int64_t P, int64_t hd,
                             float scale, float* scores, float* out) {
  float mx = -INFINITY;
  for (int64_t p = 0; p < P; ++p) {
    scores[p] = dot_avx512(q, keys + p * hd, hd) * scale;
    mx = std::max(mx, scores[p]);
  }
  const float inv = 1.f / exp_shifted_avx512(scores, P, mx);
  std::fill(out, out + hd, 0.f);
  for (int64_t p = 0; p < P; ++p) axpy_avx512(scores[p] * inv, values + p * hd, out, hd);
}

// exp on 8 lanes with AVX2 and FMA: the same reduction and polynomial as exp16; 2^n is built
// in the exponent bits (n stays within [-126, 127] after the clamp).
AVX2_TARGET inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.f / 720.f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(pow2n));
}

AVX2_TARGET inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}

AVX2_TARGET void silu_mul_avx2(const float* gate, const float* up, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
    const __m256 s = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.f), e));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(s, _mm256_loadu_ps(up + i)));
  }
  for (; i < n; ++i) out[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
}

AVX2_TARGET inline float dot_avx2(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = hsum8(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

AVX2_TARGET inline void axpy_avx2(float alpha, const float* x, float* y, int64_t n) {
  const __m256 a = _mm256_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(a, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += alpha * x[i];
}

AVX2_TARGET void attend_avx2(const float* q, const float* keys, const float* values, int64_t P, int64_t hd,
                             float scale, float* scores, float* out) {
  float mx = -INFINITY;
  for (int64_t p = 0; p < P; ++p) {
    scores[p] = dot_avx2(q, keys + p * hd, hd) * scale;
    mx = std::max(mx, scores[p]);
  }
  __m256 total = _mm256_setzero_ps();
  const __m256 m = _mm256_set1_ps(mx);
  int64_t p = 0;
  for (; p + 8 <= P; p += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + p), m));
    _mm256_storeu_ps(scores + p, e);
    total = _mm256_add_ps(total, e);
  }
  float sum = hsum8(total);
  for (; p < P; ++p) {
    scores[p] = std::exp(scores[p] - mx);
    sum += scores[p];
  }
  std::fill(out, out + hd, 0.f);
  const float inv = 1.f / sum;
  for (p = 0; p < P; ++p) axpy_avx2(scores[p] * inv, values + p * hd, out, hd);
}

// The G query heads that share one KV head (grouped-query attention), head_dim 16 HD16, in one
// pass over the keys and one over the values: each key and value line is loaded once for the G
// heads, and the outputs stay in registers over all positions (CB lines of 16 per head at a time).
// Each head's arithmetic is attend_avx512's, in the same order, so the results are bitwise the same.
template <int G, int HD16>
AVX512_TARGET void attend_group_avx512(const float* q, const float* keys, const float* values, int64_t P,
                                       float scale, float* scores, float* out) {
  constexpr int64_t hd = 16 * HD16;
  constexpr int CB = HD16 < 16 / G ? HD16 : 16 / G;  // output lines per head in registers per pass
  float mx[G], inv[G];
  for (int g = 0; g < G; ++g) mx[g] = -INFINITY;
  for (int64_t p = 0; p < P; ++p) {
    __m512 k[HD16];
    for (int c = 0; c < HD16; ++c) k[c] = _mm512_loadu_ps(keys + p * hd + c * 16);
    for (int g = 0; g < G; ++g) {
      __m512 acc = _mm512_setzero_ps();
      for (int c = 0; c < HD16; ++c) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * hd + c * 16), k[c], acc);
      const float v = _mm512_reduce_add_ps(acc) * scale;
      scores[g * P + p] = v;
      mx[g] = std::max(mx[g], v);
    }
  }
  for (int g = 0; g < G; ++g) inv[g] = 1.f / exp_shifted_avx512(scores + g * P, P, mx[g]);
  for (int c0 = 0; c0 < HD16; c0 += CB) {
    __m512 acc[G][CB];
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < CB; ++c) acc[g][c] = _mm512_setzero_ps();
    for (int64_t p = 0; p < P; ++p) {
      __m512 v[CB];
      for (int c = 0; c < CB; ++c) v[c] = _mm512_loadu_ps(values + p * hd + (c0 + c) * 16);
      for (int g = 0; g < G; ++g) {
        const __m512 a = _mm512_set1_ps(scores[g * P + p] * inv[g]);
        for (int c = 0; c < CB; ++c) acc[g][c] = _mm512_fmadd_ps(a, v[c], acc[g][c]);
      }
    }
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < CB; ++c) _mm512_storeu_ps(out + g * hd + (c0 + c) * 16, acc[g][c]);
  }
}

// attend_group_avx512 for group heads of head_dim hd, where it has code (false: call attend_avx512
// per head). scores: group x P floats.
AVX512_TARGET bool attend_group_avx512_any(const float* q, const float* keys, const float* values, int64_t P,
                                           int64_t hd, int64_t group, float scale, float* scores, float* out) {
  using Fn = void (*)(const float*, const float*, const float*, int64_t, float, float*, float*);
  static constexpr Fn by64[4] = {attend_group_avx512<1, 4>, attend_group_avx512<2, 4>, attend_group_avx512<3, 4>,
                                 attend_group_avx512<4, 4>};
  static constexpr Fn by128[4] = {attend_group_avx512<1, 8>, attend_group_avx512<2, 8>, attend_group_avx512<3, 8>,
                                  attend_group_avx512<4, 8>};
  if (group < 1 || group > 4 || (hd != 64 && hd != 128)) return false;
  (hd == 64 ? by64 : by128)[group - 1](q, keys, values, P, scale, scores, out);
  return true;
}

void attend_generic(const float* q, const float* keys, const float* values, int64_t P, int64_t hd, float scale,
                    float* scores, float* out) {
  float mx = -INFINITY;
  for (int64_t p = 0; p < P; ++p) {
    float s = 0.f;
    for (int64_t i = 0; i < hd; ++i) s += q[i] * keys[p * hd + i];
    scores[p] = s * scale;
    mx = std::max(mx, scores[p]);
  }
  float sum = 0.f;
  for (int64_t p = 0; p < P; ++p) {
    scores[p] = std::exp(scores[p] - mx);
    sum += scores[p];
  }
  std::fill(out, out + hd, 0.f);
  for (int64_t p = 0; p < P; ++p) {
    const float w = scores[p] / sum;
    for (int64_t i = 0; i < hd; ++i) out[i] += w * values[p * hd + i];
  }
}

// ------------------------------------------------------------------ the model
// One token through every layer not skipped, over int8 matrices (DraftModel: the draft) or fp32
// ones (Fp32Model: the full model's plain step); the same code but for the products.
inline void product(const Int8Matrix& m, const float* x, QuantizedRow& xq, float* y) {
  quantize(x, m.k, xq);  // activations per tensor, as the torch path's dynamic quantization
  gemv(m, xq, y);
}

inline void product(const Fp32Matrix& m, const float* x, QuantizedRow&, float* y) {
  fp32_product(m, x, 1, y, m.n);  // one row: x is its own transpose
}

// y[T, N] = x[T, K] @ W.T for T rows (row-major), one pass over the weights per FP32_MAX_ROWS rows.
void products(const Fp32Matrix& m, const float* x, int64_t T, float* y) {
  std::vector<float> xt(m.k * std::min(T, FP32_MAX_ROWS));
  for (int64_t t0 = 0; t0 < T; t0 += FP32_MAX_ROWS) {
    const int64_t rows = std::min(FP32_MAX_ROWS, T - t0);
    for (int64_t t = 0; t < rows; ++t)
      for (int64_t i = 0; i < m.k; ++i) xt[i * rows + t] = x[(t0 + t) * m.k + i];
    fp32_product(m, xt.data(), rows, y + t0 * m.n, m.n);
  }
}

void products(const Int8Matrix& m, const float* x, int64_t T, float* y) {
  std::vector<QuantizedRow> xs(T);
  for (int64_t t = 0; t < T; ++t) quantize(x + t * m.k, m.k, xs[t]);  // per row, as the one-row draft
  gemv_rows(m, xs, y);
}

inline int64_t model_isa(const Int8Matrix*, int64_t isa) { return checked_isa(isa, "draft model"); }
inline int64_t model_isa(const Fp32Matrix*, int64_t isa) { return checked_fp32_isa(isa, "fp32 model"); }

template <class Matrix>
struct Layer {
  Matrix qkv, o, gate_up, down;  // qkv carries the layer's q/k/v bias, if any
  torch::Tensor input_norm, post_norm;  // float32 [hidden]
};

template <class Matrix>
class OneTokenModel {
 public:
  OneTokenModel(torch::Tensor embed, torch::Tensor final_norm, const Matrix& head, int64_t num_heads,
             int64_t num_kv_heads, int64_t head_dim, double eps, int64_t isa)
      : embed_(check_float(embed, 2, "embed")),
        final_norm_(check_float(final_norm, 1, "final_norm")),
        head_(head),
        heads_(num_heads),
        kv_heads_(num_kv_heads),
        head_dim_(head_dim),
        eps_(static_cast<float>(eps)),
        isa_(model_isa(static_cast<const Matrix*>(nullptr), isa)) {
    TORCH_CHECK(num_heads > 0 && num_kv_heads > 0 && num_heads % num_kv_heads == 0,
                "num_heads must be a multiple of num_kv_heads");
    TORCH_CHECK(head_dim > 0 && head_dim % 2 == 0, "head_dim must be even");
    hidden_ = embed_.size(1);
    TORCH_CHECK(final_norm_.size(0) == hidden_ && head_.k == hidden_, "lm_head/final_norm do not match the hidden size");
  }

  void add_layer(const Matrix& qkv, c10::optional<torch::Tensor> qkv_bias, const Matrix& o, const Matrix& gate_up,
                 const Matrix& down, torch::Tensor input_norm, torch::Tensor post_norm) {
    Layer<Matrix> l;
    l.qkv = qkv;  // a copy of the handles: the bias below is this model's, not the shared matrix's
    if (qkv_bias.has_value() && qkv_bias->defined()) {
      TORCH_CHECK(qkv_bias->dim() == 1 && qkv_bias->size(0) == qkv.n, "qkv bias has the wrong size");
      l.qkv.bias = qkv_bias->to(torch::kFloat32).contiguous();
    }
    l.o = o;
    l.gate_up = gate_up;
    l.down = down;
    l.input_norm = check_float(input_norm, 1, "input_norm");
    l.post_norm = check_float(post_norm, 1, "post_norm");
    TORCH_CHECK(l.qkv.k == hidden_ && l.qkv.n == (heads_ + 2 * kv_heads_) * head_dim_, "qkv has the wrong shape");
    TORCH_CHECK(l.o.k == heads_ * head_dim_ && l.o.n == hidden_, "o has the wrong shape");
    TORCH_CHECK(l.gate_up.k == hidden_ && l.gate_up.n % 2 == 0, "gate_up has the wrong shape");
    TORCH_CHECK(l.down.k == l.gate_up.n / 2 && l.down.n == hidden_, "down has the wrong shape");
    TORCH_CHECK(l.input_norm.size(0) == hidden_ && l.post_norm.size(0) == hidden_, "norms have the wrong size");
    layers_.push_back(std::move(l));
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }
  int64_t isa() const { return isa_; }

  // Switch every product and float helper to another instruction set (the weights stay as they
  // are: every instruction set reads the same blocked layout).
  void set_isa(int64_t isa) {
    isa_ = model_isa(static_cast<const Matrix*>(nullptr), isa);
    head_.isa = isa_;
    for (Layer<Matrix>& l : layers_) l.qkv.isa = l.o.isa = l.gate_up.isa = l.down.isa = isa_;
  }

  // Logits [1, vocab] for `token` at `position`; writes K/V of every layer not in `skip` at
  // `position` in keys[l] / values[l] ([1, kv_heads, capacity, head_dim] float32 each).
  // cos/sin: [>position, head_dim] tables, sin signed as in the Python rope() (x*cos + roll(x)*sin).
  torch::Tensor forward(int64_t token, const std::vector<torch::Tensor>& keys, const std::vector<torch::Tensor>& values,
                        int64_t position, const torch::Tensor& cos, const torch::Tensor& sin,
                        const std::vector<int64_t>& skip) {
    const int64_t L = num_layers(), hd = head_dim_, H = heads_, KVH = kv_heads_, D = hidden_;
    TORCH_CHECK(token >= 0 && token < embed_.size(0), "token id ", token, " is out of range");
    TORCH_CHECK(static_cast<int64_t>(keys.size()) == L && static_cast<int64_t>(values.size()) == L,
                "expected one key and one value tensor per layer");
    TORCH_CHECK(cos.scalar_type() == torch::kFloat32 && sin.scalar_type() == torch::kFloat32 && cos.is_contiguous() &&
                sin.is_contiguous() && cos.size(0) > position && sin.size(0) > position && cos.size(1) == hd,
                "rotary tables do not cover position ", position);
    std::vector<char> skipped(L, 0);
    for (int64_t s : skip) {
      TORCH_CHECK(s >= 0 && s < L, "skipped layer ", s, " is out of range");
      skipped[s] = 1;
    }
    std::vector<float> x(embed_.data_ptr<float>() + token * D, embed_.data_ptr<float>() + (token + 1) * D);
    std::vector<float> h(D), tmp(D), qkv, attn(H * hd), gu, act, rotated(hd);
    QuantizedRow xq;
    const float* c = cos.data_ptr<float>() + position * hd;
    const float* s = sin.data_ptr<float>() + position * hd;
    const int64_t half = hd / 2, group = H / KVH, P = position + 1;
    const float scale = 1.f / std::sqrt(static_cast<float>(hd));
    for (int64_t l = 0; l < L; ++l) {
      if (skipped[l]) continue;
      const Layer<Matrix>& ly = layers_[l];
      const torch::Tensor& kc = keys[l];
      const torch::Tensor& vc = values[l];
      TORCH_CHECK(kc.scalar_type() == torch::kFloat32 && vc.scalar_type() == torch::kFloat32 && kc.is_contiguous() &&
                  vc.is_contiguous() && kc.dim() == 4 && kc.size(1) == KVH && kc.size(3) == hd &&
                  kc.sizes() == vc.sizes() && kc.size(2) > position,
                  "KV cache of layer ", l, " does not fit position ", position);
      const int64_t capacity = kc.size(2);
      // attention
      rms_norm(x.data(), ly.input_norm.template data_ptr<float>(), D, eps_, h.data());
      qkv.resize(ly.qkv.n);
      product(ly.qkv, h.data(), xq, qkv.data());
      float* kbase = kc.data_ptr<float>();
      float* vbase = vc.data_ptr<float>();
      for (int64_t head = 0; head < H + KVH; ++head) {  // q heads, then k heads
        float* v = qkv.data() + head * hd;
        for (int64_t i = 0; i < hd; ++i) rotated[i] = v[i] * c[i] + v[(i + half) % hd] * s[i];
        std::copy(rotated.begin(), rotated.end(), v);
      }
      for (int64_t g = 0; g < KVH; ++g) {
        std::copy_n(qkv.data() + (H + g) * hd, hd, kbase + (g * capacity + position) * hd);
        std::copy_n(qkv.data() + (H + KVH + g) * hd, hd, vbase + (g * capacity + position) * hd);
      }
      if (grouped_attention()) {  // the heads of a KV head together (bitwise the same results)
        at::parallel_for(0, KVH, 1, [&](int64_t g0, int64_t g1) {
          std::vector<float> scores(group * P);
          for (int64_t g = g0; g < g1; ++g)
            attend_group_avx512_any(qkv.data() + g * group * hd, kbase + g * capacity * hd, vbase + g * capacity * hd,
                                    P, hd, group, scale, scores.data(), attn.data() + g * group * hd);
        });
      } else {
        at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
          std::vector<float> scores(P);
          for (int64_t head = h0; head < h1; ++head) {
            const int64_t g = head / group;
            const float* kg = kbase + g * capacity * hd;
            const float* vg = vbase + g * capacity * hd;
            if (isa_ == ISA_AVX512_VNNI || isa_ == ISA_AVX512) {
              attend_avx512(qkv.data() + head * hd, kg, vg, P, hd, scale, scores.data(), attn.data() + head * hd);
            } else if (isa_ == ISA_AVX2) {
              attend_avx2(qkv.data() + head * hd, kg, vg, P, hd, scale, scores.data(), attn.data() + head * hd);
            } else {
              attend_generic(qkv.data() + head * hd, kg, vg, P, hd, scale, scores.data(), attn.data() + head * hd);
            }
          }
        });
      }
      product(ly.o, attn.data(), xq, tmp.data());
      for (int64_t i = 0; i < D; ++i) x[i] += tmp[i];
      // MLP
      rms_norm(x.data(), ly.post_norm.template data_ptr<float>(), D, eps_, h.data());
      gu.resize(ly.gate_up.n);
      product(ly.gate_up, h.data(), xq, gu.data());
      const int64_t inter = ly.gate_up.n / 2;
      act.resize(inter);
      if (isa_ == ISA_AVX512_VNNI || isa_ == ISA_AVX512) {
        silu_mul_avx512(gu.data(), gu.data() + inter, inter, act.data());
      } else if (isa_ == ISA_AVX2) {
        silu_mul_avx2(gu.data(), gu.data() + inter, inter, act.data());
      } else {
        silu_mul_generic(gu.data(), gu.data() + inter, inter, act.data());
      }
      product(ly.down, act.data(), xq, tmp.data());
      for (int64_t i = 0; i < D; ++i) x[i] += tmp[i];
    }
    rms_norm(x.data(), final_norm_.data_ptr<float>(), D, eps_, h.data());
    torch::Tensor logits = torch::empty({1, head_.n}, torch::kFloat32);
    product(head_, h.data(), xq, logits.data_ptr<float>());
    return logits;
  }

  // Logits [N, vocab] for N tokens at once: row i is token tokens[i] at position positions[i] of KV
  // slot slots[i], skipping the layers in skips[i]. The rows of one request are consecutive
  // positions of its slot (a segment: a verification, or one draft token of each of several
  // requests). Each layer writes the K/V of every row that runs it before any row attends, and
  // row i attends to positions 0..positions[i] of its own slot, so a segment is causal within
  // itself. Rows that skip a layer keep their state through it (and write no K/V there); the
  // others share its products. keys[l] / values[l]: [slots, kv_heads, capacity, head_dim] float32.
  torch::Tensor forward_rows(const std::vector<int64_t>& tokens, const std::vector<int64_t>& slots,
                             const std::vector<int64_t>& positions, const std::vector<torch::Tensor>& keys,
                             const std::vector<torch::Tensor>& values, const torch::Tensor& cos,
                             const torch::Tensor& sin, const std::vector<std::vector<int64_t>>& skips) {
    const int64_t L = num_layers(), hd = head_dim_, H = heads_, KVH = kv_heads_, D = hidden_;
    const int64_t N = static_cast<int64_t>(tokens.size());
    TORCH_CHECK(N >= 1 && static_cast<int64_t>(slots.size()) == N && static_cast<int64_t>(positions.size()) == N &&
                (skips.empty() || static_cast<int64_t>(skips.size()) == N),
                "expected one slot, position (and skip set) per token");
    TORCH_CHECK(static_cast<int64_t>(keys.size()) == L && static_cast<int64_t>(values.size()) == L,
                "expected one key and one value tensor per layer");
    TORCH_CHECK(cos.scalar_type() == torch::kFloat32 && sin.scalar_type() == torch::kFloat32 && cos.is_contiguous() &&
                sin.is_contiguous() && cos.size(1) == hd && sin.sizes() == cos.sizes(), "bad rotary tables");
    std::vector<char> skipped(N * L, 0);
    for (int64_t i = 0; i < N; ++i) {
      TORCH_CHECK(tokens[i] >= 0 && tokens[i] < embed_.size(0), "token id ", tokens[i], " is out of range");
      TORCH_CHECK(positions[i] >= 0 && positions[i] < cos.size(0), "rotary tables do not cover position ",
                  positions[i]);
      if (!skips.empty())
        for (int64_t l : skips[i]) {
          TORCH_CHECK(l >= 0 && l < L, "skipped layer ", l, " is out of range");
          skipped[i * L + l] = 1;
        }
    }
    std::vector<float> x(N * D);
    for (int64_t i = 0; i < N; ++i)
      std::copy_n(embed_.data_ptr<float>() + tokens[i] * D, D, x.data() + i * D);
    std::vector<float> h, tmp, qkv, attn, gu, act;
    std::vector<int64_t> rows;  // the rows that run the current layer
    const int64_t half = hd / 2, group = H / KVH;
    const float scale = 1.f / std::sqrt(static_cast<float>(hd));
    for (int64_t l = 0; l < L; ++l) {
      rows.clear();
      for (int64_t i = 0; i < N; ++i)
        if (!skipped[i * L + l]) rows.push_back(i);
      if (rows.empty()) continue;
      const int64_t R = static_cast<int64_t>(rows.size());
      const Layer<Matrix>& ly = layers_[l];
      const torch::Tensor& kc = keys[l];
      const torch::Tensor& vc = values[l];
      TORCH_CHECK(kc.scalar_type() == torch::kFloat32 && vc.scalar_type() == torch::kFloat32 && kc.is_contiguous() &&
                  vc.is_contiguous() && kc.dim() == 4 && kc.size(1) == KVH && kc.size(3) == hd &&
                  kc.sizes() == vc.sizes(), "KV cache of layer ", l, " has the wrong layout");
      const int64_t num_slots = kc.size(0), capacity = kc.size(2);
      for (int64_t i : rows)
        TORCH_CHECK(slots[i] >= 0 && slots[i] < num_slots && positions[i] < capacity, "KV cache of layer ", l,
                    " does not fit slot ", slots[i], " position ", positions[i]);
      float* kbase = kc.data_ptr<float>();
      float* vbase = vc.data_ptr<float>();
      // attention
      h.resize(R * D);
      for (int64_t r = 0; r < R; ++r)
        rms_norm(x.data() + rows[r] * D, ly.input_norm.template data_ptr<float>(), D, eps_, h.data() + r * D);
      const int64_t W = ly.qkv.n;
      qkv.resize(R * W);
      products(ly.qkv, h.data(), R, qkv.data());
      for (int64_t r = 0; r < R; ++r) {
        const int64_t i = rows[r], pos = positions[i];
        const float* c = cos.data_ptr<float>() + pos * hd;
        const float* s = sin.data_ptr<float>() + pos * hd;
        float* row = qkv.data() + r * W;
        float rotated[1024];
        TORCH_CHECK(hd <= 1024, "head_dim over 1024");
        for (int64_t head = 0; head < H + KVH; ++head) {  // q heads, then k heads
          float* v = row + head * hd;
          for (int64_t j = 0; j < hd; ++j) rotated[j] = v[j] * c[j] + v[(j + half) % hd] * s[j];
          std::copy_n(rotated, hd, v);
        }
        for (int64_t g = 0; g < KVH; ++g) {
          const int64_t at = ((slots[i] * KVH + g) * capacity + pos) * hd;
          std::copy_n(row + (H + g) * hd, hd, kbase + at);
          std::copy_n(row + (H + KVH + g) * hd, hd, vbase + at);
        }
      }
      attn.resize(R * H * hd);
      if (grouped_attention()) {  // per row, the heads of a KV head together (bitwise the same results)
        at::parallel_for(0, R * KVH, 1, [&](int64_t w0, int64_t w1) {
          std::vector<float> scores;
          for (int64_t w = w0; w < w1; ++w) {
            const int64_t r = w / KVH, g = w % KVH, i = rows[r], P = positions[i] + 1;
            scores.resize(group * P);
            attend_group_avx512_any(qkv.data() + r * W + g * group * hd,
                                    kbase + (slots[i] * KVH + g) * capacity * hd,
                                    vbase + (slots[i] * KVH + g) * capacity * hd, P, hd, group, scale, scores.data(),
                                    attn.data() + (r * H + g * group) * hd);
          }
        });
      } else {
        at::parallel_for(0, R * H, 1, [&](int64_t w0, int64_t w1) {
          std::vector<float> scores;
          for (int64_t w = w0; w < w1; ++w) {
            const int64_t r = w / H, head = w % H, i = rows[r], g = head / group, P = positions[i] + 1;
            scores.resize(P);
            const float* kg = kbase + (slots[i] * KVH + g) * capacity * hd;
            const float* vg = vbase + (slots[i] * KVH + g) * capacity * hd;
            const float* q = qkv.data() + r * W + head * hd;
            float* out = attn.data() + (r * H + head) * hd;
            if (isa_ == ISA_AVX512_VNNI || isa_ == ISA_AVX512) {
              attend_avx512(q, kg, vg, P, hd, scale, scores.data(), out);
            } else if (isa_ == ISA_AVX2) {
              attend_avx2(q, kg, vg, P, hd, scale, scores.data(), out);
            } else {
              attend_generic(q, kg, vg, P, hd, scale, scores.data(), out);
            }
          }
        });
      }
      tmp.resize(R * D);
      products(ly.o, attn.data(), R, tmp.data());
      for (int64_t r = 0; r < R; ++r)
        for (int64_t j = 0; j < D; ++j) x[rows[r] * D + j] += tmp[r * D + j];
      // MLP
      for (int64_t r = 0; r < R; ++r)
        rms_norm(x.data() + rows[r] * D, ly.post_norm.template data_ptr<float>(), D, eps_, h.data() + r * D);
      const int64_t G = ly.gate_up.n, inter = G / 2;
      gu.resize(R * G);
      products(ly.gate_up, h.data(), R, gu.data());
      act.resize(R * inter);
      for (int64_t r = 0; r < R; ++r) {
        const float* gate = gu.data() + r * G;
        if (isa_ == ISA_AVX512_VNNI || isa_ == ISA_AVX512) {
          silu_mul_avx512(gate, gate + inter, inter, act.data() + r * inter);
        } else if (isa_ == ISA_AVX2) {
          silu_mul_avx2(gate, gate + inter, inter, act.data() + r * inter);
        } else {
          silu_mul_generic(gate, gate + inter, inter, act.data() + r * inter);
        }
      }
      products(ly.down, act.data(), R, tmp.data());
      for (int64_t r = 0; r < R; ++r)
        for (int64_t j = 0; j < D; ++j) x[rows[r] * D + j] += tmp[r * D + j];
    }
    h.resize(N * D);
    for (int64_t i = 0; i < N; ++i) rms_norm(x.data() + i * D, final_norm_.data_ptr<float>(), D, eps_, h.data() + i * D);
    torch::Tensor logits = torch::empty({N, head_.n}, torch::kFloat32);
    products(head_, h.data(), N, logits.data_ptr<float>());
    return logits;
  }

 public:
  bool group_heads_ = true;  // see grouped_attention()

 private:
  // Whether attention runs a KV head's query heads together (attend_group_avx512: AVX-512, head_dim
  // 64 or 128, up to 4 query heads per KV head; group_heads_ off: one head at a time, for tests).
  bool grouped_attention() const {
    const int64_t group = heads_ / kv_heads_;
    return group_heads_ && (isa_ == ISA_AVX512_VNNI || isa_ == ISA_AVX512) && (head_dim_ == 64 || head_dim_ == 128) && group >= 1 &&
           group <= 4;
  }

  static torch::Tensor check_float(const torch::Tensor& t, int64_t dim, const char* name) {
    TORCH_CHECK(t.dim() == dim && t.scalar_type() == torch::kFloat32 && t.device().is_cpu(), name,
                ": expected a float32 CPU tensor with ", dim, " dimension(s)");
    return t.contiguous();
  }

  torch::Tensor embed_, final_norm_;
  Matrix head_;
  std::vector<Layer<Matrix>> layers_;
  int64_t heads_, kv_heads_, head_dim_, hidden_ = 0;
  float eps_;
  int64_t isa_;
};

using DraftModel = OneTokenModel<Int8Matrix>;
using Fp32Model = OneTokenModel<Fp32Matrix>;

}  // namespace

// The Python class of OneTokenModel<Matrix> (DraftModel over int8 matrices, Fp32Model over fp32).
template <class Matrix>
void bind_one_token_model(py::module_& m, const char* name) {
  using Model = OneTokenModel<Matrix>;
  py::class_<Model>(m, name)
      .def(py::init<torch::Tensor, torch::Tensor, const Matrix&, int64_t, int64_t, int64_t, double, int64_t>(),
           py::arg("embed"), py::arg("final_norm"), py::arg("head"), py::arg("num_heads"), py::arg("num_kv_heads"),
           py::arg("head_dim"), py::arg("eps"), py::arg("isa"))
      .def("add_layer", &Model::add_layer)
      .def_property_readonly("num_layers", &Model::num_layers)
      .def_property("isa", &Model::isa, &Model::set_isa)
      .def_readwrite("group_heads", &Model::group_heads_,
                     "attention over a KV head's query heads together where the code has it (AVX-512, "
                     "head_dim 64/128, up to 4 per KV head); off: one head at a time (the same results)")
      .def("forward_rows", &Model::forward_rows, py::call_guard<py::gil_scoped_release>(), py::arg("tokens"),
           py::arg("slots"), py::arg("positions"), py::arg("keys"), py::arg("values"), py::arg("cos"), py::arg("sin"),
           py::arg("skips"))
      .def("forward", &Model::forward, py::call_guard<py::gil_scoped_release>(), py::arg("token"),
           py::arg("keys"), py::arg("values"), py::arg("position"), py::arg("cos"), py::arg("sin"), py::arg("skip"));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "clasp: one int8 draft token per call on CPU, and fp32 few-row products";
  m.def("cpu_supports", &cpu_supports, py::arg("isa"),
        "whether this CPU can run instruction set isa (0 portable, 1 AVX2, 2 AVX-512 VNNI, 3 AVX-512F)");
  py::class_<Int8Matrix>(m, "Int8Matrix")
      .def(py::init([](torch::Tensor blocked, torch::Tensor scale, torch::Tensor rowsum, int64_t n, int64_t k,
                       c10::optional<torch::Tensor> bias, int64_t isa) {
             return make_matrix(blocked, scale, rowsum, n, k, bias, isa);
           }),
           py::arg("blocked"), py::arg("scale"), py::arg("rowsum"), py::arg("n"), py::arg("k"), py::arg("bias"),
           py::arg("isa"))
      .def_property(
          "isa", [](const Int8Matrix& m) { return m.isa; },
          [](Int8Matrix& m, int64_t isa) { m.isa = checked_isa(isa, "int8 matrix"); })
      .def("forward", &Int8Matrix::forward, py::call_guard<py::gil_scoped_release>(), py::arg("x"));
  py::class_<Fp32Matrix>(m, "Fp32Matrix")
      .def(py::init([](torch::Tensor blocked, int64_t n, int64_t k, c10::optional<torch::Tensor> bias, int64_t isa) {
             return make_fp32_matrix(blocked, n, k, bias, isa);
           }),
           py::arg("blocked"), py::arg("n"), py::arg("k"), py::arg("bias"), py::arg("isa"))
      .def_property(
          "isa", [](const Fp32Matrix& m) { return m.isa; },
          [](Fp32Matrix& m, int64_t isa) { m.isa = checked_fp32_isa(isa, "fp32 matrix"); })
      .def_property_readonly("shape", [](const Fp32Matrix& m) { return std::make_tuple(m.n, m.k); })
      .def("forward", &Fp32Matrix::forward, py::call_guard<py::gil_scoped_release>(), py::arg("x"))
      .def("__call__", &Fp32Matrix::forward, py::call_guard<py::gil_scoped_release>(), py::arg("x"));
  bind_one_token_model<Int8Matrix>(m, "DraftModel");
  bind_one_token_model<Fp32Matrix>(m, "Fp32Model");
}
