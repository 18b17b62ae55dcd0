// Fused selective scan for CPUs (VMamba, docs/design.md §3.7 and §5), forward and backward.
//
// Built at first use by vmamba_cli/kernels/scan_cpu.py and called through ctypes: plain C ABI,
// raw float32 pointers, no PyTorch headers (so the build takes seconds and survives torch updates).
//
// Working layout is channels-last: one pixel (or time step) is a contiguous row of channels, and
// every loop vectorises over 8 contiguous channels (GCC/Clang vector extensions: AVX2 with
// -march=native, two SSE halves or NEON otherwise). The state stays float32.
//
// Two problem kinds share the same step code:
//   fused  cross_selective_scan: x (B, L, Di) is read along the four scan routes of docs/design.md §3.7 by
//          index arithmetic, delta is formed on the fly from the per-pixel x_proj output
//          (dt_projs_weight · dts + bias), and the four directions are summed into y (B, L, Di).
//          Nothing of shape (B, 4, Di, L) is ever built.
//   plain  selective_scan on (B, L, K*D) rows with delta given (one group = one direction).
// Threads take (batch, [group,] channel block) tasks; a fused task runs all four directions in
// turn, so it alone owns its output channels (no atomics, no per-direction copies). When that
// leaves too few tasks for wide channel blocks (batch 1, few channels), the directions are split
// into two or four route groups, each summing into its own slice of y; the caller adds the slices.
//
// Backward: the forward saves the state entering every `chunk` steps; the backward recomputes
// each chunk from its saved state (keeping the chunk's states in a small scratch buffer) and
// then runs the reverse-time recurrence of docs/design.md §5.3 over it.

#if defined(__SSE__)
#include <xmmintrin.h>
#endif
#if defined(__AVX__)
#include <immintrin.h>
#endif

#include <cstdint>
#include <cstring>
#include <exception>
#include <new>
#include <type_traits>
#include <vector>

namespace {

// The step code must be one straight-line block per group: GCC otherwise keeps vsoftplus and
// 32-byte memcpys as out-of-line calls (spilling every vector around them) once the group
// functions grow, which costs more than the arithmetic itself.
#define VMAMBA_INLINE inline __attribute__((always_inline))
#define VMAMBA_UNROLL _Pragma("GCC unroll 16")

constexpr int kLanes = 8;
typedef float vf __attribute__((vector_size(32)));
typedef float vf_unaligned __attribute__((vector_size(32), aligned(4), may_alias));
typedef int32_t vi __attribute__((vector_size(32)));

VMAMBA_INLINE vf splat(float s) { return vf{} + s; }

VMAMBA_INLINE vf load(const float* p, int n) {
  vf v;
  if (n == kLanes) {
    v = *reinterpret_cast<const vf_unaligned*>(p);
  } else {
    v = vf{};
    for (int i = 0; i < n; ++i) v[i] = p[i];
  }
  return v;
}

VMAMBA_INLINE void store(float* p, vf v, int n) {
  if (n == kLanes) {
    *reinterpret_cast<vf_unaligned*>(p) = v;
  } else {
    for (int i = 0; i < n; ++i) p[i] = v[i];
  }
}

inline float hsum(vf v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

// out[k] = hsum(v[k]) for k < count; with AVX, eight (then four) vectors are reduced together by a
// horizontal-add tree instead of one at a time (the backward does this for every step).
VMAMBA_INLINE void store_sums(float* out, const vf* v, int count) {
  int k = 0;
#if defined(__AVX__)
  for (; k + 8 <= count; k += 8) {
    const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(v[k], v[k + 1]), _mm256_hadd_ps(v[k + 2], v[k + 3]));
    const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(v[k + 4], v[k + 5]), _mm256_hadd_ps(v[k + 6], v[k + 7]));
    _mm256_storeu_ps(out + k, _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31)));
  }
  for (; k + 4 <= count; k += 4) {
    const __m256 u = _mm256_hadd_ps(_mm256_hadd_ps(v[k], v[k + 1]), _mm256_hadd_ps(v[k + 2], v[k + 3]));
    _mm_storeu_ps(out + k, _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1)));
  }
#endif
  for (; k < count; ++k) out[k] = hsum(v[k]);
}

VMAMBA_INLINE vf bits_to_float(vi b) { return reinterpret_cast<vf>(b); }

// Clamps as single max/min instructions where available; the input goes second, so a NaN input
// comes out unchanged (x86 max/min return their second operand when either is NaN).
VMAMBA_INLINE vf clamp_below(vf x, float lo) {
#if defined(__AVX__)
  return _mm256_max_ps(splat(lo), x);
#else
  return x < lo ? splat(lo) : x;
#endif
}

VMAMBA_INLINE vf clamp_above(vf x, float hi) {
#if defined(__AVX__)
  return _mm256_min_ps(splat(hi), x);
#else
  return x > hi ? splat(hi) : x;
#endif
}

// exp(x) = 2^(x log2 e): k = round(x log2 e) from the low mantissa bits of (x log2 e + magic)
// (no float-to-int conversion), 2^f for f in [-1/2, 1/2] by a degree-6 least-squares fit on
// Chebyshev nodes (relative error 1e-7), and 2^k built as float bits. Rounding x log2 e adds a
// relative error of about |x| * 6e-8: at most 1.2e-6 where the result is not negligible
// (x > -20, e^x > 2e-9), below what the scan's outputs show. Against the Cephes form (two-part ln 2 reduction, degree 5 in x, 1 ulp) it
// measured 10-12 % faster per step and gave the same errors against a float64 reference.
// Inputs are clamped to [-126, 127] in log2 units: below, 2^-126 (~1e-38) instead of 0, which no
// caller can tell apart (it multiplies states of order 1). kNonPositive: the caller guarantees
// x <= 0 (or NaN), so only the lower clamp is needed. NaN stays NaN (max/min keep it; the final
// multiply propagates it whatever the exponent bits).
template <bool kNonPositive = false>
VMAMBA_INLINE vf vexp(vf x) {
  x = clamp_below(x * 1.44269504088896341f, -126.0f);
  if (!kNonPositive) x = clamp_above(x, 127.0f);
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const vf shifted = x + magic;
  const vf f = x - (shifted - magic);
  vf p = splat(1.5337577497120947e-4f);
  p = p * f + 1.3399859890341759e-3f;
  p = p * f + 9.618519805371761e-3f;
  p = p * f + 5.550329014658928e-2f;
  p = p * f + 2.4022646248340607e-1f;
  p = p * f + 6.931471824645996e-1f;
  p = p * f + 1.0f;
  const vi k = reinterpret_cast<vi>(shifted) - reinterpret_cast<vi>(magic);
  return p * bits_to_float((k + 127) << 23);
}

// log1p(t) for t in [0, 1] as t * P(t), P a degree-9 least-squares fit on Chebyshev nodes:
// relative error <= 1.7e-7 in float32 (no range reduction, no division).
VMAMBA_INLINE vf vlog1p_unit(vf t) {
  vf p = splat(-0.0031639994122087955f);
  p = p * t + 0.019487686455249786f;
  p = p * t - 0.05626952648162842f;
  p = p * t + 0.10532950609922409f;
  p = p * t - 0.15263274312019348f;
  p = p * t + 0.19661018252372742f;
  p = p * t - 0.24951167404651642f;
  p = p * t + 0.33329665660858154f;
  p = p * t - 0.49999889731407166f;
  p = p * t + 1.0f;
  return t * p;
}

// softplus with PyTorch's threshold (z > 20: identity), as max(z, 0) + log1p(exp(-|z|)): one exp,
// one polynomial, full relative precision for small steps. Optionally also sigmoid(z), its
// derivative (1 above the threshold, as in PyTorch's backward).
VMAMBA_INLINE vf vsoftplus(vf z, vf* sigmoid) {
  const vf neg_abs = reinterpret_cast<vf>(reinterpret_cast<vi>(z) | int32_t(0x80000000u));  // -|z|
  const vf t = vexp<true>(neg_abs);
  const vi above = z > 20.0f;
  if (sigmoid) *sigmoid = above ? splat(1.0f) : (z > 0.0f ? splat(1.0f) : t) / (1.0f + t);
  const vf sp = clamp_below(z, 0.0f) + vlog1p_unit(t);
  return above ? z : sp;
}

// Mirrors the ctypes Structure in scan_cpu.py: keep field order and types in sync.
struct Problem {
  int64_t batch, length, height, width;
  int64_t channels;        // row width (floats per pixel) of u / y / delta / du / ddelta / grad_y
  int64_t groups;          // fused: 4 directions; plain: B/C groups
  int64_t group_channels;  // channels scanned per group (fused: all channels)
  int64_t d_state, rank;   // N, R (plain: R = 0)
  int64_t block;           // channels per task (multiple of kLanes)
  int64_t chunk;           // steps between saved states
  int32_t fused, softplus, num_threads;
  int32_t route_groups;     // fused: directions split into this many task groups (1, 2 or 4), each
                            // summing into its own (B, L, C) slice of y (forward) / du (backward)
  const float *u, *delta, *proj, *wdt, *bias, *A, *D, *grad_y, *states_in;
  float *y, *states, *du, *ddelta, *red, *dwdt, *dbias, *dA, *dD;
};

// Everything one (batch, group, channel block) pass needs, as base pointers at pixel 0 / channel
// c0. Pixel p of the route is at base + p * row (channel rows) or base + p * prow (proj rows).
struct Run {
  int64_t length;
  int nc, N, R, chunk;
  bool softplus, accumulate;
  const int32_t* route;  // sequence index -> pixel; nullptr = identity
  int64_t row, prow;
  const float *u, *delta, *proj, *wdt, *bias, *A, *D, *g;
  int64_t wdt_row, a_row;
  float *y, *states, *du, *ddelta, *red, *dwdt, *dbias, *dA, *dD;
  const float* states_in;
  int64_t state_chunk, state_row;
};

// Per-thread scratch, grown on demand and reused across tasks.
struct Scratch {
  std::vector<vf> buf;
  vf* get(size_t n) {
    if (buf.size() < n) buf.resize(n);
    return buf.data();
  }
};

VMAMBA_INLINE int lanes(const Run& r, int v, int nv) { return v == nv - 1 ? r.nc - (nv - 1) * kLanes : kLanes; }

// kFull: every vector of the group has kLanes channels, so loads and stores need no lane checks.
template <bool kFull>
VMAMBA_INLINE int group_lanes(const Run& r, int v, int nv) { return kFull ? kLanes : lanes(r, v, nv); }

// Calls f(std::integral_constant<int, size>, std::integral_constant<bool, kFull>, v0) over the
// block's nv vectors: groups of G while they hold only full vectors, then the rest (at most G) in
// halving sizes G, G/2, ..., 1, each fully unrolled so its chains still overlap. kFull
// is false only for the piece holding a partial last vector. Halving sizes compile 2 log2(G) + 2
// step variants instead of 2G for every size below G, which halves the first-use build time.
template <int G, int S = G, class F>
VMAMBA_INLINE void for_each_tail(int nv, bool last_full, int& v, F&& f) {
  if constexpr (S > 0) {
    if (nv - v >= S) {
      if (last_full || v + S < nv) {
        f(std::integral_constant<int, S>{}, std::true_type{}, v);
      } else {
        f(std::integral_constant<int, S>{}, std::false_type{}, v);
      }
      v += S;
    }
    for_each_tail<G, S / 2>(nv, last_full, v, f);
  }
}

template <int G, class F>
VMAMBA_INLINE void for_each_group(const Run& r, int nv, F&& f) {
  const int full = r.nc / kLanes;  // vectors with all kLanes channels
  int v = 0;
  for (; v + G <= full; v += G) f(std::integral_constant<int, G>{}, std::true_type{}, v);
  for_each_tail<G>(nv, full == nv, v, f);
}

// Parameters of the block's channels as vectors: bias, D, A (nv x N), dt_projs_weight (R x nv).
struct Params {
  vf *bias, *D, *A, *W;
};

inline Params load_params(const Run& r, int nv, int N, int R, vf* mem) {
  Params q{mem, mem + nv, mem + 2 * nv, mem + 2 * nv + nv * N};
  for (int v = 0; v < nv; ++v) {
    const int n_l = lanes(r, v, nv);
    q.bias[v] = load(r.bias + v * kLanes, n_l);
    q.D[v] = load(r.D + v * kLanes, n_l);
    for (int n = 0; n < N; ++n) q.A[v * N + n] = load(r.A + n * r.a_row + v * kLanes, n_l);
    for (int k = 0; k < R; ++k) q.W[k * nv + v] = load(r.wdt + k * r.wdt_row + v * kLanes, n_l);
  }
  return q;
}

inline size_t params_size(int nv, int N, int R) { return size_t(nv) * (2 + N + R); }

// The per-step scalars (dts, B, C of this pixel and direction) broadcast once per step: the
// channel loop then reads them from L1 instead of re-broadcasting (and re-loading past stores).
VMAMBA_INLINE void broadcast_row(const float* pr, int count, vf* out) {
  for (int k = 0; k < count; ++k) out[k] = splat(pr[k]);
}

// Steps ahead to prefetch. A column-major route jumps W pixels per step: every step touches new
// cache lines (and pages) that the hardware prefetchers do not predict, and one step's work is
// too long for out-of-order execution to reach the next step's loads by itself.
constexpr int kPrefetch = 8;

inline void prefetch_row(const float* p, int n, bool write) {
  for (int i = 0; i < n; i += 16) {
    if (write) {
      __builtin_prefetch(p + i, 1, 3);
    } else {
      __builtin_prefetch(p + i, 0, 3);
    }
  }
}

inline void prefetch_step(const Run& r, int64_t l, int R, int N, bool backward) {
  if (l >= r.length) return;
  const int64_t p = r.route ? r.route[l] : l;
  prefetch_row(r.u + p * r.row, r.nc, false);
  prefetch_row(r.proj + p * r.prow, R + 2 * N, false);
  if (!backward) {
    if (r.y) prefetch_row(r.y + p * r.row, r.nc, true);
  } else {
    prefetch_row(r.g + p * r.row, r.nc, false);
    prefetch_row(r.du + p * r.row, r.nc, true);
  }
  if (r.delta) prefetch_row(r.delta + p * r.row, r.nc, false);
}

// Channel vectors processed together. One vector's step is a long dependency chain (R-term dot
// product -> exp -> polynomial -> exp), ~200 cycles of latency for ~100 instructions; laying out
// kGroup independent chains stage by stage lets out-of-order execution overlap them. Eight ran
// 1.0-1.2x faster than four at 56x56x192 on Zen 3 (kernel called directly), despite the spills.
#ifndef VMAMBA_SCAN_GROUP
#define VMAMBA_SCAN_GROUP 8
#endif
constexpr int kGroup = VMAMBA_SCAN_GROUP;
static_assert(kGroup > 0 && (kGroup & (kGroup - 1)) == 0, "for_each_group's halving tail needs a power of two");

// Step sizes (and sigmoids when wanted) of G channel vectors from v0 at pixel p.
template <int G, bool kProj, bool kFull>
VMAMBA_INLINE void group_steps(const Run& r, const Params& q, int R, int nv, int v0, int64_t p, const vf* row,
                        vf* dt, vf* sig) {
  vf z[G];
  VMAMBA_UNROLL
  for (int g = 0; g < G; ++g) z[g] = q.bias[v0 + g];
  if (kProj) {
    for (int k = 0; k < R; ++k) {
      const vf d = row[k];
      VMAMBA_UNROLL
      for (int g = 0; g < G; ++g) z[g] += q.W[k * nv + v0 + g] * d;
    }
  } else {
    VMAMBA_UNROLL
    for (int g = 0; g < G; ++g) z[g] += load(r.delta + p * r.row + (v0 + g) * kLanes, group_lanes<kFull>(r, v0 + g, nv));
  }
  VMAMBA_UNROLL
  for (int g = 0; g < G; ++g) {
    if (sig) sig[g] = splat(1.0f);
    dt[g] = r.softplus ? vsoftplus(z[g], sig ? sig + g : nullptr) : z[g];
  }
}

template <int G, int kN, bool kProj, bool kFull>
__attribute__((noinline)) void forward_group(const Run& r, const Params& q, int R, int N, int nv, int v0, int64_t p,
                          const vf* row, vf* h, const float* up, float* yp) {
  const vf* Bv = row + R;
  const vf* Cv = Bv + N;
  vf dt[G], dtx[G], x[G], out[G];
  group_steps<G, kProj, kFull>(r, q, R, nv, v0, p, row, dt, nullptr);
  VMAMBA_UNROLL
  for (int g = 0; g < G; ++g) {
    x[g] = load(up + (v0 + g) * kLanes, group_lanes<kFull>(r, v0 + g, nv));
    dtx[g] = dt[g] * x[g];
    out[g] = q.D[v0 + g] * x[g];
  }
  for (int n = 0; n < N; ++n) {
    VMAMBA_UNROLL
    for (int g = 0; g < G; ++g) {
      vf& hn = h[(v0 + g) * N + n];
      hn = vexp(dt[g] * q.A[(v0 + g) * N + n]) * hn + dtx[g] * Bv[n];
      out[g] += hn * Cv[n];
    }
  }
  VMAMBA_UNROLL
  for (int g = 0; g < G; ++g) {
    const int n_l = group_lanes<kFull>(r, v0 + g, nv);
    if (r.accumulate) out[g] += load(yp + (v0 + g) * kLanes, n_l);
    store(yp + (v0 + g) * kLanes, out[g], n_l);
  }
}

template <int kN, bool kProj>
void forward_run(const Run& r, Scratch& s) {
  const int N = kN > 0 ? kN : r.N;
  const int R = kProj ? r.R : 0;
  const int nv = (r.nc + kLanes - 1) / kLanes;
  vf* mem = s.get(params_size(nv, N, R) + size_t(nv) * N + R + 2 * N);
  const Params q = load_params(r, nv, N, R, mem);
  vf* h = mem + params_size(nv, N, R);
  for (int i = 0; i < nv * N; ++i) h[i] = vf{};
  vf* row = h + size_t(nv) * N;  // this step's dts | B | C, broadcast

  for (int64_t l = 0; l < r.length; ++l) {
    if (r.states && l % r.chunk == 0) {
      float* st = r.states + (l / r.chunk) * r.state_chunk;
      for (int v = 0; v < nv; ++v)
        for (int n = 0; n < N; ++n) store(st + n * r.state_row + v * kLanes, h[v * N + n], lanes(r, v, nv));
    }
    prefetch_step(r, l + kPrefetch, R, N, false);
    const int64_t p = r.route ? r.route[l] : l;
    broadcast_row(r.proj + p * r.prow, R + 2 * N, row);
    const float* up = r.u + p * r.row;
    float* yp = r.y + p * r.row;
    for_each_group<kGroup>(r, nv, [&](auto size, auto full, int v) {
      forward_group<decltype(size)::value, kN, kProj, decltype(full)::value>(r, q, R, N, nv, v, p, row, h, up, yp);
    });
  }
}

// Backward's chunk recomputation for G vectors: keeps step sizes, sigmoids, decays and states.
template <int G, int kN, bool kProj, bool kFull>
__attribute__((noinline)) void recompute_group(const Run& r, const Params& q, int R, int N, int nv, int v0, int64_t p,
                            const vf* row, const vf* h_prev, vf* h_cur, vf* c_dt, vf* c_sig, vf* c_dA,
                            const float* up) {
  const vf* Bv = row + R;
  vf dt[G], sig[G];
  group_steps<G, kProj, kFull>(r, q, R, nv, v0, p, row, dt, sig);
  VMAMBA_UNROLL
  for (int g = 0; g < G; ++g) {
    const int v = v0 + g;
    c_dt[v] = dt[g];
    c_sig[v] = sig[g];
    const vf dtx = dt[g] * load(up + v * kLanes, group_lanes<kFull>(r, v, nv));
    for (int n = 0; n < N; ++n) {
      const vf dA = vexp(dt[g] * q.A[v * N + n]);
      c_dA[v * N + n] = dA;
      h_cur[v * N + n] = dA * h_prev[v * N + n] + dtx * Bv[n];
    }
  }
}

template <int kN, bool kProj>
void backward_run(const Run& r, Scratch& s) {
  const int N = kN > 0 ? kN : r.N;
  const int R = kProj ? r.R : 0;
  const int nv = (r.nc + kLanes - 1) / kLanes;
  const int T = r.chunk;
  const size_t np = params_size(nv, N, R), nvN = size_t(nv) * N;
  // params | carry | h_in | acc dW | acc bias | acc A | acc D | red | row | chunk: dt, sig, dA, h
  const size_t total = np + 2 * nvN + size_t(R) * nv + nv + nvN + nv + 2 * (R + 2 * N) + size_t(T) * (2 * nv + 2 * nvN) + nv;
  vf* mem = s.get(total);
  for (size_t i = np; i < total; ++i) mem[i] = vf{};
  const Params q = load_params(r, nv, N, R, mem);
  vf* carry = mem + np;
  vf* h_in = carry + nvN;
  vf* acc_w = h_in + nvN;
  vf* acc_bias = acc_w + size_t(R) * nv;
  vf* acc_A = acc_bias + nv;
  vf* acc_D = acc_A + nvN;
  vf* red = acc_D + nv;
  vf* row = red + (R + 2 * N);  // this step's dts | B | C, broadcast
  const vf* Bv = row + R;
  const vf* Cv = Bv + N;
  vf* c_dt = row + (R + 2 * N);
  vf* c_sig = c_dt + size_t(T) * nv;
  vf* c_dA = c_sig + size_t(T) * nv;
  vf* c_h = c_dA + size_t(T) * nvN;
  vf* dz_step = c_h + size_t(T) * nvN;  // this step's d(loss)/dz of every vector

  const int64_t n_chunks = (r.length + T - 1) / T;
  for (int64_t c = n_chunks - 1; c >= 0; --c) {
    const int64_t l0 = c * T;
    const int steps = int(r.length - l0 < T ? r.length - l0 : T);
    const float* st = r.states_in + c * r.state_chunk;
    for (int v = 0; v < nv; ++v)
      for (int n = 0; n < N; ++n) h_in[v * N + n] = load(st + n * r.state_row + v * kLanes, lanes(r, v, nv));

    // Recompute the chunk forward, keeping step sizes, decays and states.
    for (int i = 0; i < steps; ++i) {
      const int64_t l = l0 + i;
      if (i + kPrefetch < steps) prefetch_step(r, l + kPrefetch, R, N, false);
      const int64_t p = r.route ? r.route[l] : l;
      broadcast_row(r.proj + p * r.prow, R + 2 * N, row);
      const float* up = r.u + p * r.row;
      const vf* h_prev = i ? c_h + size_t(i - 1) * nvN : h_in;
      vf* h_cur = c_h + size_t(i) * nvN;
      vf* dt_i = c_dt + size_t(i) * nv;
      vf* sig_i = c_sig + size_t(i) * nv;
      vf* dA_i = c_dA + size_t(i) * nvN;
      for_each_group<kGroup>(r, nv, [&](auto size, auto full, int v) {
        recompute_group<decltype(size)::value, kN, kProj, decltype(full)::value>(r, q, R, N, nv, v, p, row, h_prev,
                                                                                 h_cur, dt_i, sig_i, dA_i, up);
      });
    }

    // Reverse-time pass (docs/design.md §5.3); `carry` holds exp(dt_{t+1} A) * dh_{t+1}.
    for (int i = steps - 1; i >= 0; --i) {
      const int64_t l = l0 + i;
      if (l >= kPrefetch) prefetch_step(r, l - kPrefetch, R, N, true);
      const int64_t p = r.route ? r.route[l] : l;
      broadcast_row(r.proj + p * r.prow, R + 2 * N, row);
      const float* up = r.u + p * r.row;
      const float* gp = r.g + p * r.row;
      float* dup = r.du + p * r.row;
      for (int k = 0; k < R + 2 * N; ++k) red[k] = vf{};
      vf* red_B = red + R;
      vf* red_C = red_B + N;
      for (int v = 0; v < nv; ++v) {
        const int n_l = lanes(r, v, nv);
        const vf g = load(gp + v * kLanes, n_l);
        const vf x = load(up + v * kLanes, n_l);
        const vf dt = c_dt[i * nv + v];
        const vf dtx = dt * x;
        const vf* hp = i ? c_h + (size_t(i - 1) * nv + v) * N : h_in + v * N;
        const vf* hc = c_h + (size_t(i) * nv + v) * N;
        const vf* dA = c_dA + (size_t(i) * nv + v) * N;
        vf* cv = carry + v * N;
        vf d_dt = vf{}, dh_B = vf{};
        for (int n = 0; n < N; ++n) {
          const vf dh = g * Cv[n] + cv[n];
          red_C[n] += g * hc[n];
          red_B[n] += dh * dtx;
          dh_B += dh * Bv[n];
          const vf through = dh * hp[n] * dA[n];
          d_dt += through * q.A[v * N + n];
          acc_A[v * N + n] += through * dt;
          cv[n] = dA[n] * dh;
        }
        d_dt += dh_B * x;
        vf du = q.D[v] * g + dh_B * dt;
        if (r.accumulate) du += load(dup + v * kLanes, n_l);
        store(dup + v * kLanes, du, n_l);
        const vf dz = d_dt * c_sig[i * nv + v];
        acc_D[v] += g * x;
        acc_bias[v] += dz;
        if (kProj) {
          dz_step[v] = dz;
        } else {
          store(r.ddelta + p * r.row + v * kLanes, dz, n_l);
        }
      }
      // dts gradient and dt_projs_weight accumulation, rank by rank: the sum over vectors stays in
      // a register instead of a load-add-store through red[k] per vector.
      if (kProj) {
        for (int k = 0; k < R; ++k) {
          const vf d = row[k];
          const vf* w = q.W + size_t(k) * nv;
          vf* aw = acc_w + size_t(k) * nv;
          vf sum = vf{};
          for (int v = 0; v < nv; ++v) {
            sum += w[v] * dz_step[v];
            aw[v] += dz_step[v] * d;
          }
          red[k] = sum;
        }
      }
      float* rp = r.red + p * r.prow;
      store_sums(rp, red, R + 2 * N);
    }
  }

  for (int v = 0; v < nv; ++v) {
    const int n_l = lanes(r, v, nv);
    store(r.dbias + v * kLanes, acc_bias[v], n_l);
    store(r.dD + v * kLanes, acc_D[v], n_l);
    for (int n = 0; n < N; ++n) store(r.dA + n * r.a_row + v * kLanes, acc_A[v * N + n], n_l);
    for (int k = 0; k < R; ++k) store(r.dwdt + k * r.wdt_row + v * kLanes, acc_w[k * nv + v], n_l);
  }
}

// Sequence index -> pixel for the four directions (docs/design.md §3.7): row-major, column-major, and both
// reversed. Pixel p = h * W + w.
std::vector<int32_t> build_routes(int64_t H, int64_t W) {
  const int64_t L = H * W;
  std::vector<int32_t> routes(4 * L);
  int32_t* r0 = routes.data();
  int32_t* r1 = r0 + L;
  int32_t* r2 = r1 + L;
  int32_t* r3 = r2 + L;
  for (int64_t l = 0; l < L; ++l) {
    r0[l] = int32_t(l);
    r2[l] = int32_t(L - 1 - l);
  }
  for (int64_t w = 0; w < W; ++w)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t l = w * H + h;
      r1[l] = int32_t(h * W + w);
      r3[L - 1 - l] = int32_t(h * W + w);
    }
  return routes;
}

// Pointers of one (batch b, group k, channel block j) pass; a fused pass writes y / du slice
// `slice` and adds into it unless it is the first direction there (`accumulate`).
Run make_run(const Problem& P, const int32_t* routes, int64_t b, int64_t k, int64_t j, bool backward,
             int64_t slice = 0, bool accumulate = false) {
  const int64_t L = P.length, C = P.channels, G = P.groups, Dg = P.group_channels, N = P.d_state;
  const int64_t R = P.fused ? P.rank : 0;
  const int64_t width = R + 2 * N;                      // proj floats per (pixel, group)
  const int64_t nblk = (Dg + P.block - 1) / P.block;
  const int64_t c0 = j * P.block;
  const int64_t col = (P.fused ? 0 : k * Dg) + c0;      // column of channel c0 in a pixel row
  const int64_t param = k * Dg + c0;                    // index into (G * Dg) parameters
  const int64_t n_chunks = (L + P.chunk - 1) / P.chunk;
  Run r{};
  r.length = L;
  r.nc = int(Dg - c0 < P.block ? Dg - c0 : P.block);
  r.N = int(N);
  r.R = int(R);
  r.chunk = int(P.chunk);
  r.softplus = P.softplus != 0;
  r.accumulate = accumulate;
  const int64_t slice_offset = slice * P.batch * L * C;
  r.route = P.fused ? routes + k * L : nullptr;
  r.row = C;
  r.prow = G * width;
  r.u = P.u + b * L * C + col;
  r.delta = P.delta ? P.delta + b * L * C + col : nullptr;
  r.proj = P.proj + b * L * G * width + k * width;
  r.wdt = P.wdt ? P.wdt + k * R * Dg + c0 : nullptr;
  r.wdt_row = Dg;
  r.bias = P.bias + param;
  r.A = P.A + k * N * Dg + c0;
  r.a_row = Dg;
  r.D = P.D + param;
  r.state_row = Dg;
  r.state_chunk = N * Dg;
  const int64_t state_base = (b * G + k) * n_chunks * N * Dg + c0;
  if (!backward) {
    r.y = P.y + slice_offset + b * L * C + col;
    r.states = P.states ? P.states + state_base : nullptr;
  } else {
    r.states_in = P.states_in + state_base;
    r.g = P.grad_y + b * L * C + col;
    r.du = P.du + slice_offset + b * L * C + col;
    r.ddelta = P.ddelta ? P.ddelta + b * L * C + col : nullptr;
    r.red = P.red + (b * nblk + j) * L * G * width + k * width;
    r.dwdt = P.dwdt ? P.dwdt + (b * G + k) * R * Dg + c0 : nullptr;
    r.dbias = P.dbias + (b * G + k) * Dg + c0;
    r.dA = P.dA + (b * G + k) * N * Dg + c0;
    r.dD = P.dD + (b * G + k) * Dg + c0;
  }
  return r;
}

template <bool kBackward>
void dispatch(const Run& r, bool fused, Scratch& s) {
  if (kBackward) {
    if (fused) {
      r.N == 1 ? backward_run<1, true>(r, s) : backward_run<0, true>(r, s);
    } else {
      r.N == 1 ? backward_run<1, false>(r, s) : backward_run<0, false>(r, s);
    }
  } else {
    if (fused) {
      r.N == 1 ? forward_run<1, true>(r, s) : forward_run<0, true>(r, s);
    } else {
      r.N == 1 ? forward_run<1, false>(r, s) : forward_run<0, false>(r, s);
    }
  }
}

template <bool kBackward>
int run_problem(const Problem* P) {
  if (!P || P->block <= 0 || P->block % kLanes || P->chunk <= 0 || P->length <= 0) return 2;
  std::vector<int32_t> routes;
  if (P->fused) {
    if (P->groups != 4 || P->height * P->width != P->length) return 2;
    routes = build_routes(P->height, P->width);
  }
  const int64_t nblk = (P->group_channels + P->block - 1) / P->block;
  // A fused task runs the directions of its route group over its channels and alone writes them
  // in its slice of y / du (one group: all four directions, one slice).
  const int64_t route_groups = P->fused && P->route_groups > 1 ? P->route_groups : 1;
  if (4 % route_groups) return 2;
  const int64_t per_group = 4 / route_groups;
  const int64_t per_batch = P->fused ? nblk * route_groups : P->groups * nblk;
  const int64_t tasks = P->batch * per_batch;
  const int threads = P->num_threads > 0 ? P->num_threads : 1;
  int status = 0;
#pragma omp parallel num_threads(threads)
  {
    // Flush denormals to zero while we run: decaying states over long zero runs would otherwise
    // drop into denormal arithmetic, which costs ~100x per operation (values < 1.2e-38 become 0).
#if defined(__SSE__)
    const unsigned int saved_csr = _mm_getcsr();
    _mm_setcsr(saved_csr | 0x8040);
#endif
    Scratch scratch;
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      try {
        const int64_t b = t / per_batch, rest = t % per_batch;
        if (P->fused) {
          const int64_t slice = rest / nblk, j = rest % nblk;
          for (int64_t k = slice * per_group; k < (slice + 1) * per_group; ++k)
            dispatch<kBackward>(make_run(*P, routes.data(), b, k, j, kBackward, slice, k > slice * per_group),
                                true, scratch);
        } else {
          dispatch<kBackward>(make_run(*P, nullptr, b, rest / nblk, rest % nblk, kBackward), false, scratch);
        }
      } catch (const std::bad_alloc&) {
#pragma omp atomic write
        status = 3;
      } catch (...) {
#pragma omp atomic write
        status = 4;
      }
    }
#if defined(__SSE__)
    _mm_setcsr(saved_csr);
#endif
  }
  return status;
}

}  // namespace

extern "C" {

// Returns 0 on success, 2 for inconsistent sizes, 3 when out of memory, 4 for other failures.
int vmamba_scan_forward(const Problem* problem) { return run_problem<false>(problem); }
int vmamba_scan_backward(const Problem* problem) { return run_problem<true>(problem); }
int vmamba_scan_abi_version() { return 1; }
int vmamba_scan_problem_size() { return int(sizeof(Problem)); }

}
