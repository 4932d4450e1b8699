// AVX-512 build of simd.h; compiled with -mavx512f/bw/vl/dq/bf16 -mfma and called only when
// the CPU has them (simd_dispatch.cc). Raw pointers and intrinsics only: no std:: templates
// that could be merged with the portable build's copies.
//
// MatmulBlock has three forms:
//   - bf16, few activation rows (decode): StreamTile. Each weight row is read once,
//     contiguously from its first to its last element, with U independent accumulators
//     along K per activation row; the activation rows stay in L1. A caller that hands a
//     thread a contiguous range of rows (ParallelMatmul) gives the hardware prefetcher one
//     long sequential stream per core. Interleaving 4-8 rows that lie 2 KiB apart (the
//     earlier Tile<m, 4> form) reached 22 GB/s on two cores against 43 GB/s for this form.
//   - bf16, many activation rows (prefill): the packed-panel kernel (MatmulPacked).
//   - f32 weights: the register-tiled dot-product form (Tile).
#include <immintrin.h>

#include <utility>


#include "kernels/cpu/internal/simd.h"

namespace moe::kernels::cpu::internal::avx512 {
namespace {

constexpr int kMr = 4;  // activation rows per tile
constexpr int kNr = 4;  // weight rows per tile
constexpr int kNrDecode = 8;  // weight rows per tile when m <= 3
// Prefetch distance along a weight row. Measured on one Zen 4 core, M = 1, N = 4096,
// K = 1024, 8 rows per tile: 2 KiB ahead was best among {none, 2, 4, 8, 16 KiB, next tile}
// (+6-10 % over none).
constexpr int kPrefetchBytes = 2048;
// From this many activation rows on, bf16 matmuls use the packed-panel kernel below, which
// packs every weight panel once per call (the packing is amortised over the rows). Below it
// they stream (StreamTile). See kStreamMaxRows in simd.h.
constexpr int64_t kPackedMinRows = kStreamMaxRows + 1;

// Horizontal sums of four vectors: {Σa, Σb, Σc, Σd}.
inline __m128 Reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
  auto half = [](__m512 v) {
    __m256 lo = _mm512_castps512_ps256(v);
    __m256 hi = _mm512_castps512_ps256(_mm512_shuffle_f32x4(v, v, 0xee));
    __m256 s = _mm256_add_ps(lo, hi);
    return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  };
  __m128 ab = _mm_hadd_ps(half(a), half(b));
  __m128 cd = _mm_hadd_ps(half(c), half(d));
  return _mm_hadd_ps(ab, cd);
}

// One MR × NR tile over the full K. kBf16: A and W are bf16 (32 per step, vdpbf16ps);
// otherwise f32 (16 per step, FMA).
template <int MR, int NR, bool kBf16>
inline void Tile(const MatmulBlockArgs& args, int64_t i0, int64_t j0) {
  __m512 acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) acc[r][c] = _mm512_setzero_ps();
  const int64_t k = args.k;
  if constexpr (kBf16) {
    const uint16_t* a[MR];
    const uint16_t* w[NR];
    for (int r = 0; r < MR; ++r) a[r] = static_cast<const uint16_t*>(args.a_rows[i0 + r]);
    for (int c = 0; c < NR; ++c) w[c] = static_cast<const uint16_t*>(args.w) + (j0 + c) * args.ldw;
    int64_t kk = 0;
    for (; kk + 32 <= k; kk += 32) {
      __m512bh av[MR];
      for (int r = 0; r < MR; ++r) av[r] = (__m512bh)_mm512_loadu_si512(a[r] + kk);
      for (int c = 0; c < NR; ++c) {
        // Software prefetch a little ahead in each weight row: with 4 KiB pages the hardware
        // prefetcher stops at every page end (a 1024-wide bf16 row is half a page).
        _mm_prefetch(reinterpret_cast<const char*>(w[c] + kk) + kPrefetchBytes, _MM_HINT_T0);
        __m512bh wv = (__m512bh)_mm512_loadu_si512(w[c] + kk);
        for (int r = 0; r < MR; ++r) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], av[r], wv);
      }
    }
    if (kk < k) {
      const __mmask32 mask = static_cast<__mmask32>((1ull << (k - kk)) - 1);
      __m512bh av[MR];
      for (int r = 0; r < MR; ++r) av[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, a[r] + kk);
      for (int c = 0; c < NR; ++c) {
        __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, w[c] + kk);
        for (int r = 0; r < MR; ++r) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], av[r], wv);
      }
    }
  } else {
    const float* a[MR];
    const float* w[NR];
    for (int r = 0; r < MR; ++r) a[r] = static_cast<const float*>(args.a_rows[i0 + r]);
    for (int c = 0; c < NR; ++c) w[c] = static_cast<const float*>(args.w) + (j0 + c) * args.ldw;
    int64_t kk = 0;
    for (; kk + 16 <= k; kk += 16) {
      __m512 av[MR];
      for (int r = 0; r < MR; ++r) av[r] = _mm512_loadu_ps(a[r] + kk);
      for (int c = 0; c < NR; ++c) {
        __m512 wv = _mm512_loadu_ps(w[c] + kk);
        for (int r = 0; r < MR; ++r) acc[r][c] = _mm512_fmadd_ps(av[r], wv, acc[r][c]);
      }
    }
    if (kk < k) {
      const __mmask16 mask = static_cast<__mmask16>((1u << (k - kk)) - 1);
      __m512 av[MR];
      for (int r = 0; r < MR; ++r) av[r] = _mm512_maskz_loadu_ps(mask, a[r] + kk);
      for (int c = 0; c < NR; ++c) {
        __m512 wv = _mm512_maskz_loadu_ps(mask, w[c] + kk);
        for (int r = 0; r < MR; ++r) acc[r][c] = _mm512_fmadd_ps(av[r], wv, acc[r][c]);
      }
    }
  }
  for (int r = 0; r < MR; ++r) {
    const __m512 z = _mm512_setzero_ps();
    alignas(16) float sums[8];
    auto get = [&](int c) { return c < NR ? acc[r][c < NR ? c : 0] : z; };
    _mm_store_ps(sums, Reduce4(get(0), get(1), get(2), get(3)));
    if constexpr (NR > 4) _mm_store_ps(sums + 4, Reduce4(get(4), get(5), get(6), get(7)));
    const float scale = args.row_scale != nullptr ? args.row_scale[i0 + r] : 1.0f;
    float* c = args.c_rows[i0 + r] + j0;
    for (int cc = 0; cc < NR; ++cc) {
      c[cc] = args.accumulate ? c[cc] + scale * sums[cc] : scale * sums[cc];
    }
  }
}

template <bool kBf16, int NR>
inline void RowTiles(const MatmulBlockArgs& args, int64_t j0) {
  int64_t i0 = 0;
  for (; i0 + kMr <= args.m; i0 += kMr) Tile<kMr, NR, kBf16>(args, i0, j0);
  switch (args.m - i0) {
    case 3: Tile<3, NR, kBf16>(args, i0, j0); break;
    case 2: Tile<2, NR, kBf16>(args, i0, j0); break;
    case 1: Tile<1, NR, kBf16>(args, i0, j0); break;
    default: break;
  }
}

// Weight rows in tiles of NR, then the n % NR rest as one narrower tile.
template <bool kBf16, int NR, int... kRest>
inline void ColumnTiles(const MatmulBlockArgs& args, std::integer_sequence<int, kRest...>) {
  int64_t j0 = 0;
  for (; j0 + NR <= args.n; j0 += NR) RowTiles<kBf16, NR>(args, j0);
  const int rest = static_cast<int>(args.n - j0);
  ((rest == kRest + 1 ? (RowTiles<kBf16, kRest + 1>(args, j0), 0) : 0), ...);
}

template <bool kBf16>
void Matmul(const MatmulBlockArgs& args) {
  if (args.m <= 3) {
    // Decode: 8 weight rows in flight (8 memory streams) get closer to the read bandwidth
    // than 4 (one core, M = 1, K = 1024: 88 % vs 70 % of a plain AVX-512 read).
    ColumnTiles<kBf16, kNrDecode>(args, std::make_integer_sequence<int, kNrDecode - 1>());
  } else {
    ColumnTiles<kBf16, kNr>(args, std::make_integer_sequence<int, kNr - 1>());
  }
}

// ---- Streaming bf16 kernel for few activation rows (decode) ------------------------------
//
// MR activation rows × NR weight rows, U vectors of 32 k's per step along K: MR·NR·U
// accumulators. With NR = 1 a weight row is read start to end before the next one begins.
template <int MR, int NR, int U>
inline void StreamTile(const MatmulBlockArgs& args, int64_t i0, int64_t j0) {
  __m512 acc[MR][NR][U];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c)
      for (int u = 0; u < U; ++u) acc[r][c][u] = _mm512_setzero_ps();
  const int64_t k = args.k;
  const uint16_t* a[MR];
  const uint16_t* w[NR];
  for (int r = 0; r < MR; ++r) a[r] = static_cast<const uint16_t*>(args.a_rows[i0 + r]);
  for (int c = 0; c < NR; ++c) w[c] = static_cast<const uint16_t*>(args.w) + (j0 + c) * args.ldw;
  int64_t kk = 0;
  for (; kk + 32 * U <= k; kk += 32 * U) {
    __m512bh wv[NR][U];
    for (int c = 0; c < NR; ++c)
      for (int u = 0; u < U; ++u) wv[c][u] = (__m512bh)_mm512_loadu_si512(w[c] + kk + 32 * u);
    for (int r = 0; r < MR; ++r) {
      for (int u = 0; u < U; ++u) {
        const __m512bh av = (__m512bh)_mm512_loadu_si512(a[r] + kk + 32 * u);
        for (int c = 0; c < NR; ++c) acc[r][c][u] = _mm512_dpbf16_ps(acc[r][c][u], av, wv[c][u]);
      }
    }
  }
  for (; kk < k; kk += 32) {  // the rest, 32 (or fewer: masked) k's at a time
    const __mmask32 mask = k - kk >= 32 ? static_cast<__mmask32>(0xffffffffu)
                                        : static_cast<__mmask32>((1ull << (k - kk)) - 1);
    __m512bh wv[NR];
    for (int c = 0; c < NR; ++c) wv[c] = (__m512bh)_mm512_maskz_loadu_epi16(mask, w[c] + kk);
    for (int r = 0; r < MR; ++r) {
      const __m512bh av = (__m512bh)_mm512_maskz_loadu_epi16(mask, a[r] + kk);
      for (int c = 0; c < NR; ++c) acc[r][c][0] = _mm512_dpbf16_ps(acc[r][c][0], av, wv[c]);
    }
  }
  // Sum the U partial accumulators, then reduce four (row, column) sums at a time.
  __m512 sum[MR * NR];
  for (int r = 0; r < MR; ++r) {
    for (int c = 0; c < NR; ++c) {
      __m512 s = acc[r][c][0];
      for (int u = 1; u < U; ++u) s = _mm512_add_ps(s, acc[r][c][u]);
      sum[r * NR + c] = s;
    }
  }
  constexpr int kSums = MR * NR;
  alignas(16) float out[(kSums + 3) / 4 * 4];
  const __m512 z = _mm512_setzero_ps();
  for (int q = 0; q < kSums; q += 4) {
    _mm_store_ps(out + q, Reduce4(sum[q], q + 1 < kSums ? sum[q + 1 < kSums ? q + 1 : 0] : z,
                                  q + 2 < kSums ? sum[q + 2 < kSums ? q + 2 : 0] : z,
                                  q + 3 < kSums ? sum[q + 3 < kSums ? q + 3 : 0] : z));
  }
  for (int r = 0; r < MR; ++r) {
    const float scale = args.row_scale != nullptr ? args.row_scale[i0 + r] : 1.0f;
    float* c = args.c_rows[i0 + r] + j0;
    for (int cc = 0; cc < NR; ++cc) {
      const float v = scale * out[r * NR + cc];
      c[cc] = args.accumulate ? c[cc] + v : v;
    }
  }
}

// All activation rows against weight rows [j0, j0 + NR): groups of 4 rows, then the rest.
// The first group streams the weight rows from memory, later groups find them in L1.
template <int NR, int U4>
inline void StreamRows(const MatmulBlockArgs& args, int64_t j0) {
  int64_t i0 = 0;
  for (; i0 + 4 <= args.m; i0 += 4) StreamTile<4, NR, U4>(args, i0, j0);
  switch (args.m - i0) {
    case 3: StreamTile<3, NR, U4>(args, i0, j0); break;
    case 2: StreamTile<2, NR, U4>(args, i0, j0); break;
    case 1: StreamTile<1, NR, U4>(args, i0, j0); break;
    default: break;
  }
}

// One weight row at a time, no software prefetch: the rows of a thread's range are one
// contiguous stream. Two threads, N = 4096, K = 1024, 4 KiB pages: M = 1 reads as fast as a
// plain read loop (27 vs 25 GB/s; the earlier 8-row tiles 20 GB/s); the grouped ExpertFfn at
// 8 tokens 29 GB/s (16). Measured and rejected: pairs of weight rows for M > 4 (no faster at
// M = 8, slower for the experts) and a software prefetch 1-8 KiB ahead (within noise).
void MatmulStream(const MatmulBlockArgs& args) {
  for (int64_t j0 = 0; j0 < args.n; ++j0) StreamRows<1, 4>(args, j0);
}

inline __m512 LoadWiden(const uint16_t* p, __mmask16 mask) {
  __m512i v = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}
inline __m512 LoadWiden(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }

inline __mmask16 TailMask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1);
}

template <typename T>
void Dot(const float* q, const T* k, int64_t stride, int64_t rows, int64_t d, float* out) {
  int64_t j = 0;
  for (; j + 4 <= rows; j += 4) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                     _mm512_setzero_ps()};
    for (int64_t i = 0; i < d; i += 16) {
      const __mmask16 mask = TailMask(d - i);
      const __m512 qv = _mm512_maskz_loadu_ps(mask, q + i);
      for (int r = 0; r < 4; ++r) {
        acc[r] = _mm512_fmadd_ps(qv, LoadWiden(k + (j + r) * stride + i, mask), acc[r]);
      }
    }
    _mm_storeu_ps(out + j, Reduce4(acc[0], acc[1], acc[2], acc[3]));
  }
  for (; j < rows; ++j) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < d; i += 16) {
      const __mmask16 mask = TailMask(d - i);
      acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, q + i),
                            LoadWiden(k + j * stride + i, mask), acc);
    }
    out[j] = _mm512_reduce_add_ps(acc);
  }
}

template <typename T>
void Accumulate(const float* p, const T* v, int64_t stride, int64_t rows, int64_t d,
                float acc_scale, float* acc) {
  const __m512 scale = _mm512_set1_ps(acc_scale);
  for (int64_t i = 0; i < d; i += 16) {
    const __mmask16 mask = TailMask(d - i);
    __m512 a = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, acc + i), scale);
    for (int64_t j = 0; j < rows; ++j) {
      a = _mm512_fmadd_ps(_mm512_set1_ps(p[j]), LoadWiden(v + j * stride + i, mask), a);
    }
    _mm512_mask_storeu_ps(acc + i, mask, a);
  }
}

// ---- Packed-panel GEMM for many activation rows (prefill) --------------------------------
//
// W is packed on the fly, per panel of kPanel = 32 weight rows and kKBlock k's, into
// k-pair-interleaved form [kKBlock / 2][32][2] (one 32-bit pair per column: two zmm per pair
// step). The microkernel holds kPackedMr × 32 outputs in 24 accumulators, broadcasts one bf16
// pair of each activation row and issues 24 vdpbf16ps per k-pair: no horizontal reductions,
// 2 weight loads per 24 FMAs. The 32 KiB panel stays in L1 while all rows stream past.
constexpr int kPanel = 32;
constexpr int kKBlock = 512;  // k's per packed block (even)
constexpr int kPackedMr = 12;

// Transposes 16 vectors of 16 32-bit values in place: r[i][j] -> r[j][i].
inline void Transpose16x16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  // u[4q + e]: rows 4q..4q+3 of element e of each 128-bit lane.
  for (int q = 0; q < 4; ++q) {
    u[4 * q + 0] = _mm512_unpacklo_epi64(t[4 * q], t[4 * q + 2]);
    u[4 * q + 1] = _mm512_unpackhi_epi64(t[4 * q], t[4 * q + 2]);
    u[4 * q + 2] = _mm512_unpacklo_epi64(t[4 * q + 1], t[4 * q + 3]);
    u[4 * q + 3] = _mm512_unpackhi_epi64(t[4 * q + 1], t[4 * q + 3]);
  }
  for (int e = 0; e < 4; ++e) {
    const __m512i v0 = _mm512_shuffle_i32x4(u[e], u[4 + e], 0x44);
    const __m512i v1 = _mm512_shuffle_i32x4(u[e], u[4 + e], 0xee);
    const __m512i v2 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0x44);
    const __m512i v3 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0xee);
    r[e] = _mm512_shuffle_i32x4(v0, v2, 0x88);
    r[4 + e] = _mm512_shuffle_i32x4(v0, v2, 0xdd);
    r[8 + e] = _mm512_shuffle_i32x4(v1, v3, 0x88);
    r[12 + e] = _mm512_shuffle_i32x4(v1, v3, 0xdd);
  }
}

// dst32[p][c] = pair p of weight row c of the panel, for the ceil((k1 - k0) / 2) pairs of
// [k0, k1) (zero beyond n rows, and the high half of a last odd k).
void PackPanel(const uint16_t* w, int64_t ldw, int64_t n, int64_t k0, int64_t k1,
               uint32_t* dst32) {
  for (int64_t kk = k0; kk < k1; kk += 32) {  // 16 pairs at a time
    const int64_t left = k1 - kk;
    const __mmask32 mask =
        left >= 32 ? static_cast<__mmask32>(0xffffffffu) : static_cast<__mmask32>((1ull << left) - 1);
    const int64_t pairs = left >= 32 ? 16 : (left + 1) / 2;
    uint32_t* dst = dst32 + (kk - k0) / 2 * kPanel;
    for (int c0 = 0; c0 < kPanel; c0 += 16) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i) {
        r[i] = c0 + i < n ? _mm512_maskz_loadu_epi16(mask, w + (c0 + i) * ldw + kk)
                          : _mm512_setzero_si512();
      }
      Transpose16x16(r);
      for (int64_t p = 0; p < pairs; ++p) _mm512_store_si512(dst + p * kPanel + c0, r[p]);
    }
  }
}

template <int MR>
inline void PackedTile(const uint16_t* const* a_rows, int64_t k0, int64_t k1,
                       const uint32_t* panel, float* const* c_rows, int64_t n,
                       const float* row_scale, bool overwrite) {
  __m512 acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  const int64_t full = (k1 - k0) / 2;
  const uint32_t* a32[MR];
  for (int r = 0; r < MR; ++r) a32[r] = reinterpret_cast<const uint32_t*>(a_rows[r] + k0);
  for (int64_t p = 0; p < full; ++p) {
    const __m512bh w0 = (__m512bh)_mm512_load_si512(panel + p * kPanel);
    const __m512bh w1 = (__m512bh)_mm512_load_si512(panel + p * kPanel + 16);
    for (int r = 0; r < MR; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(a32[r][p]));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, w0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, w1);
    }
  }
  if (full * 2 < k1 - k0) {  // odd k: the last k alone (its pair partner is not read)
    const __m512bh w0 = (__m512bh)_mm512_load_si512(panel + full * kPanel);
    const __m512bh w1 = (__m512bh)_mm512_load_si512(panel + full * kPanel + 16);
    for (int r = 0; r < MR; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(a_rows[r][k1 - 1]);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, w0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, w1);
    }
  }
  const __mmask16 m0 = TailMask(n), m1 = TailMask(n - 16 > 0 ? n - 16 : 0);
  for (int r = 0; r < MR; ++r) {
    const __m512 scale = _mm512_set1_ps(row_scale != nullptr ? row_scale[r] : 1.0f);
    float* c = c_rows[r];
    __m512 v0 = _mm512_mul_ps(acc[r][0], scale), v1 = _mm512_mul_ps(acc[r][1], scale);
    if (!overwrite) {
      v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, c));
      v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, c + 16));
    }
    _mm512_mask_storeu_ps(c, m0, v0);
    _mm512_mask_storeu_ps(c + 16, m1, v1);
  }
}

template <int... MRs>
inline void PackedTileDispatch(int mr, const uint16_t* const* a_rows, int64_t k0, int64_t k1,
                               const uint32_t* panel, float* const* c_rows, int64_t n,
                               const float* row_scale, bool overwrite,
                               std::integer_sequence<int, MRs...>) {
  ((mr == MRs + 1 ? (PackedTile<MRs + 1>(a_rows, k0, k1, panel, c_rows, n, row_scale, overwrite),
                     0)
                  : 0),
   ...);
}

void MatmulPacked(const MatmulBlockArgs& args) {
  alignas(64) static thread_local uint32_t panel[kKBlock / 2 * kPanel];
  const uint16_t* const* a_rows = reinterpret_cast<const uint16_t* const*>(args.a_rows);
  const uint16_t* w = static_cast<const uint16_t*>(args.w);
  for (int64_t j0 = 0; j0 < args.n; j0 += kPanel) {
    const int64_t n = args.n - j0 < kPanel ? args.n - j0 : kPanel;
    for (int64_t k0 = 0; k0 < args.k; k0 += kKBlock) {
      const int64_t k1 = args.k - k0 < kKBlock ? args.k : k0 + kKBlock;
      PackPanel(w + j0 * args.ldw, args.ldw, n, k0, k1, panel);
      const bool overwrite = k0 == 0 && !args.accumulate;
      for (int64_t i0 = 0; i0 < args.m; i0 += kPackedMr) {
        const int mr = static_cast<int>(args.m - i0 < kPackedMr ? args.m - i0 : kPackedMr);
        float* c_rows[kPackedMr];
        for (int r = 0; r < mr; ++r) c_rows[r] = args.c_rows[i0 + r] + j0;
        PackedTileDispatch(mr, a_rows + i0, k0, k1, panel, c_rows, n,
                           args.row_scale != nullptr ? args.row_scale + i0 : nullptr, overwrite,
                           std::make_integer_sequence<int, kPackedMr>());
      }
    }
  }
}

// exp(x) for x in [-88, 88] (clamped): 2^n · p(r), r = x - n·ln2, Cephes' expf polynomial;
// ~2 ulp. _mm512_scalef_ps applies 2^n without building the exponent by hand.
inline __m512 Exp(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-88.0f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

}  // namespace

void SiluMul(const float* gate, const float* up, float* out, int64_t n) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mask = TailMask(n - i);
    const __m512 g = _mm512_maskz_loadu_ps(mask, gate + i);
    const __m512 u = _mm512_maskz_loadu_ps(mask, up + i);
    const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(one, Exp(_mm512_sub_ps(_mm512_setzero_ps(), g))));
    _mm512_mask_storeu_ps(out + i, mask, _mm512_mul_ps(silu, u));
  }
}

void MatmulBlock(const MatmulBlockArgs& args) {
  if (args.w_bf16 && args.m >= kPackedMinRows) {
    MatmulPacked(args);
  } else if (args.w_bf16) {
    MatmulStream(args);
  } else {
    Matmul<false>(args);
  }
}

void ConvertToBf16(const float* in, uint16_t* out, int64_t n) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(in + i + 16), _mm512_loadu_ps(in + i));
    _mm512_storeu_si512(out + i, (__m512i)v);
  }
  for (; i < n; i += 16) {
    const __mmask16 mask = TailMask(n - i);
    __m256bh v = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, in + i));
    _mm256_mask_storeu_epi16(out + i, mask, (__m256i)v);
  }
}

void DotRows(const float* q, const void* k, bool k_bf16, int64_t stride, int64_t rows,
             int64_t d, float* out) {
  if (k_bf16) {
    Dot(q, static_cast<const uint16_t*>(k), stride, rows, d, out);
  } else {
    Dot(q, static_cast<const float*>(k), stride, rows, d, out);
  }
}

void AccumulateRows(const float* p, const void* v, bool v_bf16, int64_t stride, int64_t rows,
                    int64_t d, float acc_scale, float* acc) {
  if (v_bf16) {
    Accumulate(p, static_cast<const uint16_t*>(v), stride, rows, d, acc_scale, acc);
  } else {
    Accumulate(p, static_cast<const float*>(v), stride, rows, d, acc_scale, acc);
  }
}

}  // namespace moe::kernels::cpu::internal::avx512
