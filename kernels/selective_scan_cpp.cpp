// The "cpp" backend of selective_scan and ss2d_scan: a fused CPU selective scan (forward and backward), built on
// first use by selective_scan_cpp.py through torch.utils.cpp_extension and parallelised with OpenMP.
//
// One work item = one batch row b and a block of V consecutive channels (SS2D: all 4 directions of them, so the
// cross-merge sums inside the item and no two items write the same output; 1-D: one B/C group). An item copies its
// inputs into position-major scratch, lanes = channels ([position][V], padded lanes zero), reading every tensor
// through its own strides: no permuted or cross-scanned copy of any input is made. The recurrence
//     h_l = exp(dt_l A) h_{l-1} + dt_l u_l B_l,  y_l = C_l . h_l (+ D u_l)
// then walks the positions in each direction's order (a table of spatial indices: rows, columns, both reversed),
// every step one SIMD operation over the V channel lanes per state. The state and all arithmetic are fp32 (fp64
// for fp64 inputs). The backward recomputes the states of one direction into scratch and runs the adjoint
// recurrence g_l = C_l dy_l + a_{l+1} g_{l+1} backwards, forming every gradient in the same pass (the math is the
// Triton kernel's, kernels/selective_scan_triton.py). Reductions over channels (dB, dC) are horizontal sums per
// position written to a per-channel-block slice, summed over blocks afterwards; over batch rows (dA, dD, dbias)
// per-row slices, summed afterwards.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int V = 16;  // channels per work item: the SIMD lanes of every inner loop (one AVX-512 fp32 register)

// ---- math that GCC vectorises over the lanes (float: Cephes polynomials, ~1 ulp; double: libm) ----------------

inline __attribute__((always_inline)) float fexp(float x) {
  x = std::min(std::max(x, -87.33f), 88.37f);  // NaN stays NaN (it is the first argument of both)
  const float t = x * 1.44269504088896341f;
  const float fn = (t + 12582912.f) - 12582912.f;  // round to nearest
  float r = x - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.f;
  int32_t bits = (static_cast<int32_t>(fn) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// log(1 + e) for e in [0, 1], accurate for small e (the argument of log is formed without rounding 1 + e).
inline __attribute__((always_inline)) float flog1p01(float e) {
  const bool big = e > 0.41421356f;               // 1 + e > sqrt(2): log(1 + e) = log 2 + log((1 + e) / 2)
  const float x = big ? (e - 1.f) * 0.5f : e;     // m - 1 with m = 1 + e or (1 + e) / 2, m in [sqrt(.5), sqrt(2)]
  const float z = x * x;
  float y = 7.0376836292e-2f;
  y = y * x - 1.1514610310e-1f;
  y = y * x + 1.1676998740e-1f;
  y = y * x - 1.2420140846e-1f;
  y = y * x + 1.4249322787e-1f;
  y = y * x - 1.6668057665e-1f;
  y = y * x + 2.0000714765e-1f;
  y = y * x - 2.4999993993e-1f;
  y = y * x + 3.3333331174e-1f;
  y = y * x * z;
  const float k = big ? 1.f : 0.f;
  y += k * -2.12194440e-4f;
  y += -0.5f * z;
  return x + y + k * 0.693359375f;
}

inline __attribute__((always_inline)) double fexp(double x) { return std::exp(x); }

// F.softplus (threshold 20) and its derivative, sharing one exp
inline __attribute__((always_inline)) void softplus(float z, float& sp, float& grad) {
  const float e = fexp(-std::fabs(z));
  const float r = 1.f / (1.f + e);
  sp = z > 20.f ? z : std::max(z, 0.f) + flog1p01(e);
  grad = z > 20.f ? 1.f : (z >= 0.f ? r : e * r);
}
inline __attribute__((always_inline)) void softplus(double z, double& sp, double& grad) {
  sp = z > 20.0 ? z : std::log1p(std::exp(z));
  grad = z > 20.0 ? 1.0 : 1.0 / (1.0 + std::exp(-z));
}

// ---- problem description --------------------------------------------------------------------------------------

// Unified views: u (Bb, Cu, H, W); delta (Bb, KG, Dg, H, W); B, C (Bb, KG, N, H, W); A (KG*Dg, N), D and bias
// (KG*Dg,) contiguous in the accumulation type. SS2D: KG = 4 directions, Cu = Dg, every item runs all 4. 1-D:
// KG = the B/C groups, Cu = KG*Dg, H = 1, every item runs its group only.
template <typename in_t, typename acc_t>
struct Problem {
  const in_t *u, *delta, *B, *C;
  const acc_t *A, *D, *bias;
  int64_t su[4], sd[5], sb[5], sc[5];
  int64_t Bb, KG, Dg, N, NP, H, W, L, nblk;
  bool ss2d, softplus;
  const int32_t* pos;  // (SS2D ? 4 : 1, L): spatial index read at each scan step
  const acc_t* bc;     // (Bb, KG, 2, L, NP): B then C of each row and group/direction, position-major (bc_rows)

  int64_t items() const { return ss2d ? Bb * nblk : Bb * KG * nblk; }
  // item -> batch row, first group/direction, end, block
  void decode(int64_t it, int64_t& b, int64_t& k0, int64_t& k1, int64_t& blk) const {
    blk = it % nblk;
    if (ss2d) { b = it / nblk; k0 = 0; k1 = KG; }
    else { b = it / (nblk * KG); k0 = (it / nblk) % KG; k1 = k0 + 1; }
  }
};

// dst[p][c] = src[c*sc + i*sh + j*sw] for p = i*W + j, c < nc; lanes nc..V-1 zero.
template <typename in_t, typename acc_t>
void load_lanes(acc_t* __restrict dst, const in_t* __restrict src, int64_t sc, int64_t sh, int64_t sw, int64_t H,
                int64_t W, int nc) {
  if (nc < V) std::fill(dst, dst + H * W * V, acc_t(0));
  if (sc == 1) {  // channels innermost in memory (channels-last): each position's lanes are one contiguous run
    for (int64_t i = 0; i < H; ++i)
      for (int64_t j = 0; j < W; ++j) {
        const in_t* s = src + i * sh + j * sw;
        acc_t* d = dst + (i * W + j) * V;
        for (int c = 0; c < nc; ++c) d[c] = static_cast<acc_t>(s[c]);
      }
  } else {
    for (int c = 0; c < nc; ++c)
      for (int64_t i = 0; i < H; ++i) {
        const in_t* s = src + c * sc + i * sh;
        acc_t* d = dst + i * W * V + c;
        for (int64_t j = 0; j < W; ++j) d[j * V] = static_cast<acc_t>(s[j * sw]);
      }
  }
}

// The inverse: dst[c*sc + i*sh + j*sw] = src[p][c] for c < nc.
template <typename acc_t>
void store_lanes(acc_t* __restrict dst, const acc_t* __restrict src, int64_t sc, int64_t sh, int64_t sw, int64_t H,
                 int64_t W, int nc) {
  if (sc == 1) {
    for (int64_t i = 0; i < H; ++i)
      for (int64_t j = 0; j < W; ++j) {
        acc_t* d = dst + i * sh + j * sw;
        const acc_t* s = src + (i * W + j) * V;
        for (int c = 0; c < nc; ++c) d[c] = s[c];
      }
  } else {
    for (int c = 0; c < nc; ++c)
      for (int64_t i = 0; i < H; ++i) {
        acc_t* d = dst + c * sc + i * sh;
        const acc_t* s = src + i * W * V + c;
        for (int64_t j = 0; j < W; ++j) d[j * sw] = s[j * V];
      }
  }
}

// B or C of (b, k) position-major, states padded to NP with zeros: dst[p*NP + n]
template <typename in_t, typename acc_t>
void load_bc(acc_t* __restrict dst, const in_t* __restrict src, const int64_t* s, int64_t N, int64_t NP, int64_t H,
             int64_t W) {
  for (int64_t i = 0; i < H; ++i)
    for (int64_t j = 0; j < W; ++j) {
      const in_t* q = src + i * s[3] + j * s[4];
      acc_t* d = dst + (i * W + j) * NP;
      for (int64_t n = 0; n < N; ++n) d[n] = static_cast<acc_t>(q[n * s[2]]);
      for (int64_t n = N; n < NP; ++n) d[n] = acc_t(0);
    }
}

// States of one item: NT > 0 a fixed-size local array (the compiler keeps it in registers), else on the heap.
template <typename acc_t, int NT>
struct States {
  alignas(64) acc_t v[NT][V];
  explicit States(int64_t) {}
  acc_t* operator[](int64_t n) { return v[n]; }
  void zero() { std::memset(v, 0, sizeof(v)); }
};
template <typename acc_t>
struct States<acc_t, 0> {
  std::vector<acc_t> v;
  explicit States(int64_t n) : v(n * V) {}
  acc_t* operator[](int64_t n) { return v.data() + n * V; }
  void zero() { std::fill(v.begin(), v.end(), acc_t(0)); }
};

// ---- one direction of one item --------------------------------------------------------------------------------

// ys[p] += C_p . h_p over one direction's scan order; dts = dt, us = u, Al[n][c] = A of lane c.
template <typename acc_t, int NT>
void scan_forward(const int32_t* __restrict pos, int64_t L, int64_t NPr, const acc_t* __restrict us,
                  const acc_t* __restrict dts, const acc_t* __restrict Bs, const acc_t* __restrict Cs,
                  const acc_t* __restrict Al, acc_t* __restrict ys) {
  const int64_t NP = NT > 0 ? NT : NPr;
  States<acc_t, NT> h(NP);
  h.zero();
  for (int64_t l = 0; l < L; ++l) {
    const int64_t p = pos[l];
    const acc_t* dt = dts + p * V;
    const acc_t* u = us + p * V;
    acc_t* y = ys + p * V;
    alignas(64) acc_t du[V], yl[V];
#pragma omp simd
    for (int c = 0; c < V; ++c) { du[c] = dt[c] * u[c]; yl[c] = acc_t(0); }
    for (int64_t n = 0; n < NP; ++n) {
      const acc_t bn = Bs[p * NP + n], cn = Cs[p * NP + n];
      acc_t* hn = h[n];
      const acc_t* an = Al + n * V;
#pragma omp simd
      for (int c = 0; c < V; ++c) {
        const acc_t hv = fexp(dt[c] * an[c]) * hn[c] + du[c] * bn;
        hn[c] = hv;
        yl[c] += hv * cn;
      }
    }
#pragma omp simd
    for (int c = 0; c < V; ++c) y[c] += yl[c];
  }
}

// The backward of one direction: recomputes the states and decays (hs, as [l][n][c], scan order), then the adjoint
// pass. sgs = d dt / d(delta + bias); dus += du (the scan part); dzs[p] = dLoss/d(delta + bias); dAl[n][c], dbl[c]
// = this direction's dA, dbias; dBo[n*L + p], dCo[n*L + p] = sums over the item's channels (n < N only).
template <typename acc_t, int NT>
void scan_backward(const int32_t* __restrict pos, int64_t L, int64_t N, int64_t NPr,
                   const acc_t* __restrict us, const acc_t* __restrict dys, const acc_t* __restrict sgs,
                   const acc_t* __restrict dts, const acc_t* __restrict Bs, const acc_t* __restrict Cs,
                   const acc_t* __restrict Al, acc_t* __restrict hs, acc_t* __restrict as, acc_t* __restrict dus,
                   acc_t* __restrict dzs, acc_t* __restrict dAl, acc_t* __restrict dbl, acc_t* __restrict dBo,
                   acc_t* __restrict dCo) {
  const int64_t NP = NT > 0 ? NT : NPr;
  {
    States<acc_t, NT> h(NP);
    h.zero();
    for (int64_t l = 0; l < L; ++l) {
      const int64_t p = pos[l];
      const acc_t* dt = dts + p * V;
      const acc_t* u = us + p * V;
      alignas(64) acc_t du[V];
#pragma omp simd
      for (int c = 0; c < V; ++c) du[c] = dt[c] * u[c];
      for (int64_t n = 0; n < NP; ++n) {
        const acc_t bn = Bs[p * NP + n];
        acc_t* hn = h[n];
        const acc_t* an = Al + n * V;
        acc_t* ho = hs + (l * NP + n) * V;
        acc_t* ao = as + (l * NP + n) * V;
#pragma omp simd
        for (int c = 0; c < V; ++c) {
          const acc_t a = fexp(dt[c] * an[c]);
          const acc_t hv = a * hn[c] + du[c] * bn;
          hn[c] = hv;
          ho[c] = hv;
          ao[c] = a;
        }
      }
    }
  }
  States<acc_t, NT> g(NP), anext(NP), dA(NP);
  g.zero();
  anext.zero();
  dA.zero();
  alignas(64) acc_t dbias[V] = {};
  alignas(64) const acc_t zero[V] = {};  // h_{-1}
  for (int64_t l = L - 1; l >= 0; --l) {
    const int64_t p = pos[l];
    const acc_t* dt = dts + p * V;
    const acc_t* u = us + p * V;
    const acc_t* dy = dys + p * V;
    alignas(64) acc_t ddt[V], du[V], dtu[V];
#pragma omp simd
    for (int c = 0; c < V; ++c) { ddt[c] = acc_t(0); du[c] = acc_t(0); dtu[c] = dt[c] * u[c]; }
    for (int64_t n = 0; n < NP; ++n) {
      const acc_t bn = Bs[p * NP + n], cn = Cs[p * NP + n];
      const acc_t* an = Al + n * V;
      const acc_t* hl = hs + (l * NP + n) * V;
      const acc_t* al = as + (l * NP + n) * V;
      const acc_t* hp = l > 0 ? hs + ((l - 1) * NP + n) * V : zero;
      acc_t *gn = g[n], *anx = anext[n], *dAn = dA[n];
      acc_t sB = 0, sC = 0;
#pragma omp simd reduction(+ : sB, sC)
      for (int c = 0; c < V; ++c) {
        const acc_t a = al[c];
        const acc_t gv = dy[c] * cn + anx[c] * gn[c];  // dLoss/dh_l through every later position
        gn[c] = gv;
        anx[c] = a;
        const acc_t dlog = gv * a * hp[c];  // dLoss/d(dt_l A): a_l h_{l-1}
        ddt[c] += gv * u[c] * bn + dlog * an[c];
        dAn[c] += dlog * dt[c];
        du[c] += gv * dt[c] * bn;
        sB += gv * dtu[c];
        sC += dy[c] * hl[c];
      }
      if (n < N) {
        dBo[n * L + p] = sB;
        dCo[n * L + p] = sC;
      }
    }
    const acc_t* sg = sgs + p * V;
    acc_t* dz = dzs + p * V;
    acc_t* dup = dus + p * V;
#pragma omp simd
    for (int c = 0; c < V; ++c) {
      const acc_t d = ddt[c] * sg[c];
      dz[c] = d;
      dbias[c] += d;
      dup[c] += du[c];
    }
  }
  for (int64_t n = 0; n < NP; ++n) std::memcpy(dAl + n * V, dA[n], V * sizeof(acc_t));
  std::memcpy(dbl, dbias, V * sizeof(acc_t));
}

// ---- items ----------------------------------------------------------------------------------------------------

template <typename in_t, typename acc_t>
struct Item {
  const Problem<in_t, acc_t>& P;
  int64_t b, k0, k1, c0;
  int nc;
  Item(const Problem<in_t, acc_t>& P_, int64_t it) : P(P_) {
    int64_t blk;
    P.decode(it, b, k0, k1, blk);
    c0 = blk * V;
    nc = static_cast<int>(std::min<int64_t>(V, P.Dg - c0));
  }
  int64_t uchan() const { return P.ss2d ? c0 : k0 * P.Dg + c0; }  // first u / y / du channel of the item
  const int32_t* order(int64_t k) const { return P.pos + (P.ss2d ? k : 0) * P.L; }
  int64_t row(int64_t k) const { return k * P.Dg + c0; }  // first row of A, D, bias
  void load_u(acc_t* us) const {
    load_lanes(us, P.u + b * P.su[0] + uchan() * P.su[1], P.su[1], P.su[2], P.su[3], P.H, P.W, nc);
  }
  // dts = dt (softplus(delta + bias) when asked), in place; sgs (backward only) = d dt / d(delta + bias)
  void load_dt(int64_t k, acc_t* dts, acc_t* sgs) const {
    load_lanes(dts, P.delta + b * P.sd[0] + k * P.sd[1] + c0 * P.sd[2], P.sd[2], P.sd[3], P.sd[4], P.H, P.W, nc);
    alignas(64) acc_t bias[V] = {};
    if (P.bias)
      for (int c = 0; c < nc; ++c) bias[c] = P.bias[row(k) + c];
    for (int64_t p = 0; p < P.L; ++p) {
      acc_t* d = dts + p * V;
      if (!P.softplus) {
#pragma omp simd
        for (int c = 0; c < V; ++c) d[c] += bias[c];
        if (sgs) std::fill(sgs + p * V, sgs + (p + 1) * V, acc_t(1));
      } else if (sgs) {
        acc_t* sg = sgs + p * V;
#pragma omp simd
        for (int c = 0; c < V; ++c) softplus(d[c] + bias[c], d[c], sg[c]);
      } else {
#pragma omp simd
        for (int c = 0; c < V; ++c) {
          acc_t unused;
          softplus(d[c] + bias[c], d[c], unused);
        }
      }
    }
  }
  const acc_t* Bs(int64_t k) const { return P.bc + ((b * P.KG + k) * 2) * P.L * P.NP; }
  const acc_t* Cs(int64_t k) const { return Bs(k) + P.L * P.NP; }
  void load_A(int64_t k, acc_t* Al) const {  // Al[n][c], padded states and lanes zero
    std::fill(Al, Al + P.NP * V, acc_t(0));
    for (int c = 0; c < nc; ++c)
      for (int64_t n = 0; n < P.N; ++n) Al[n * V + c] = P.A[(row(k) + c) * P.N + n];
  }
  void d_sum(acc_t* Ds) const {  // the skip term's weight per lane: D summed over the item's directions
    std::fill(Ds, Ds + V, acc_t(0));
    if (P.D)
      for (int64_t k = k0; k < k1; ++k)
        for (int c = 0; c < nc; ++c) Ds[c] += P.D[row(k) + c];
  }
};

template <typename acc_t>
using FwdFn = void (*)(const int32_t*, int64_t, int64_t, const acc_t*, const acc_t*, const acc_t*, const acc_t*,
                       const acc_t*, acc_t*);
template <typename acc_t>
using BwdFn = void (*)(const int32_t*, int64_t, int64_t, int64_t, const acc_t*, const acc_t*, const acc_t*,
                       const acc_t*, const acc_t*, const acc_t*, const acc_t*, acc_t*, acc_t*, acc_t*, acc_t*, acc_t*,
                       acc_t*, acc_t*, acc_t*);

// State sizes with a fixed-size kernel (float); others run the general one, as do doubles (tests, gradcheck).
int64_t padded_states(int64_t N, bool fixed) {
  if (!fixed) return N;
  for (int64_t s : {1, 2, 4, 8, 16})
    if (N <= s) return s;
  return N;
}

// The fixed-size instance of ``kernel`` for NP states (float), else the general one (0).
#define PICK_STATE_KERNEL(kernel)                   \
  if constexpr (std::is_same_v<acc_t, float>) {     \
    switch (NP) {                                   \
      case 1: return kernel<float, 1>;              \
      case 2: return kernel<float, 2>;              \
      case 4: return kernel<float, 4>;              \
      case 8: return kernel<float, 8>;              \
      case 16: return kernel<float, 16>;            \
    }                                               \
  }                                                 \
  return kernel<acc_t, 0>;

template <typename acc_t>
FwdFn<acc_t> forward_kernel(int64_t NP) { PICK_STATE_KERNEL(scan_forward) }

template <typename acc_t>
BwdFn<acc_t> backward_kernel(int64_t NP) { PICK_STATE_KERNEL(scan_backward) }

int threads_for(int64_t items) {
  if (omp_in_parallel()) return 1;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items)));
}

// B and C of every (row, group/direction) position-major, once per call: every channel block of a row reads the
// same B and C, and gathering them per item (one float per position from a strided slice) took about a sixth of an
// SS2D forward at VMamba-S's stage 1.
template <typename in_t, typename acc_t>
std::vector<acc_t> bc_rows(const Problem<in_t, acc_t>& P) {
  std::vector<acc_t> out(P.Bb * P.KG * 2 * P.L * P.NP);
  const int64_t n = P.Bb * P.KG * 2;
#pragma omp parallel for num_threads(threads_for(n)) schedule(static)
  for (int64_t r = 0; r < n; ++r) {
    const int64_t b = r / (2 * P.KG), k = (r / 2) % P.KG;
    const bool is_c = r % 2;
    const int64_t* s = is_c ? P.sc : P.sb;
    load_bc(out.data() + r * P.L * P.NP, (is_c ? P.C : P.B) + b * s[0] + k * s[1], s, P.N, P.NP, P.H, P.W);
  }
  return out;
}

template <typename in_t, typename acc_t>
void run_forward(const Problem<in_t, acc_t>& P, acc_t* y, const int64_t* sy) {
  const int64_t L = P.L, NP = P.NP, items = P.items();
  const FwdFn<acc_t> kernel = forward_kernel<acc_t>(NP);
#pragma omp parallel num_threads(threads_for(items))
  {
    std::vector<acc_t> buf(3 * L * V + (1 + NP) * V + 64);
    acc_t* us = buf.data();
    acc_t* ys = us + L * V;
    acc_t* dts = ys + L * V;
    acc_t* Al = dts + L * V;
    acc_t* Ds = Al + NP * V;
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const Item<in_t, acc_t> I(P, it);
      I.load_u(us);
      I.d_sum(Ds);
      for (int64_t p = 0; p < L; ++p) {
#pragma omp simd
        for (int c = 0; c < V; ++c) ys[p * V + c] = us[p * V + c] * Ds[c];
      }
      for (int64_t k = I.k0; k < I.k1; ++k) {
        I.load_dt(k, dts, nullptr);
        I.load_A(k, Al);
        kernel(I.order(k), L, NP, us, dts, I.Bs(k), I.Cs(k), Al, ys);
      }
      store_lanes(y + I.b * sy[0] + I.uchan() * sy[1], ys, sy[1], sy[2], sy[3], P.H, P.W, I.nc);
    }
  }
}

// du, ddelta: written through their strides; dBp, dCp: (nblk, Bb, KG, N, L); dAp (Bb, KG*Dg, N); dDp, dbp
// (Bb, KG*Dg): slices summed by the caller.
template <typename in_t, typename acc_t>
void run_backward(const Problem<in_t, acc_t>& P, const acc_t* dy, const int64_t* sdy, acc_t* du, const int64_t* sdu,
                  acc_t* dd, const int64_t* sdd, acc_t* dBp, acc_t* dCp, acc_t* dAp, acc_t* dDp, acc_t* dbp) {
  const int64_t L = P.L, NP = P.NP, N = P.N, items = P.items();
  const BwdFn<acc_t> kernel = backward_kernel<acc_t>(NP);
#pragma omp parallel num_threads(threads_for(items))
  {
    std::vector<acc_t> buf(6 * L * V + 2 * L * NP * V + (2 * NP + 2) * V + 64);
    acc_t* us = buf.data();
    acc_t* dys = us + L * V;
    acc_t* dus = dys + L * V;
    acc_t* sgs = dus + L * V;
    acc_t* dts = sgs + L * V;
    acc_t* dzs = dts + L * V;
    acc_t* hs = dzs + L * V;
    acc_t* as = hs + L * NP * V;
    acc_t* Al = as + L * NP * V;
    acc_t* dAl = Al + NP * V;
    acc_t* Ds = dAl + NP * V;
    acc_t* dbl = Ds + V;
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const Item<in_t, acc_t> I(P, it);
      const int64_t blk = I.c0 / V;
      I.load_u(us);
      load_lanes(dys, dy + I.b * sdy[0] + I.uchan() * sdy[1], sdy[1], sdy[2], sdy[3], P.H, P.W, I.nc);
      I.d_sum(Ds);
      alignas(64) acc_t dDl[V] = {};
      for (int64_t p = 0; p < L; ++p) {
#pragma omp simd
        for (int c = 0; c < V; ++c) {
          dus[p * V + c] = dys[p * V + c] * Ds[c];
          dDl[c] += dys[p * V + c] * us[p * V + c];
        }
      }
      for (int64_t k = I.k0; k < I.k1; ++k) {
        I.load_dt(k, dts, sgs);
        I.load_A(k, Al);
        const int64_t slice = ((blk * P.Bb + I.b) * P.KG + k) * N * L;
        kernel(I.order(k), L, N, NP, us, dys, sgs, dts, I.Bs(k), I.Cs(k), Al, hs, as, dus, dzs, dAl, dbl, dBp + slice,
               dCp + slice);
        store_lanes(dd + I.b * sdd[0] + k * sdd[1] + I.c0 * sdd[2], dzs, sdd[2], sdd[3], sdd[4], P.H, P.W, I.nc);
        const int64_t r = I.b * P.KG * P.Dg + I.row(k);
        for (int c = 0; c < I.nc; ++c) {
          for (int64_t n = 0; n < N; ++n) dAp[(r + c) * N + n] = dAl[n * V + c];
          dDp[r + c] = dDl[c];
          dbp[r + c] = dbl[c];
        }
      }
      store_lanes(du + I.b * sdu[0] + I.uchan() * sdu[1], dus, sdu[1], sdu[2], sdu[3], P.H, P.W, I.nc);
    }
  }
}

// ---- entry points ---------------------------------------------------------------------------------------------

std::vector<int32_t> scan_orders(bool ss2d, int64_t H, int64_t W) {
  const int64_t L = H * W;
  std::vector<int32_t> pos((ss2d ? 4 : 1) * L);
  for (int64_t l = 0; l < L; ++l) pos[l] = static_cast<int32_t>(l);  // direction 0: rows
  if (ss2d) {
    for (int64_t l = 0; l < L; ++l) {
      const int32_t col = static_cast<int32_t>((l % H) * W + l / H);  // direction 1: columns
      pos[L + l] = col;
      pos[2 * L + (L - 1 - l)] = static_cast<int32_t>(l);  // 2 and 3: 0 and 1 reversed
      pos[3 * L + (L - 1 - l)] = col;
    }
  }
  return pos;
}

template <typename in_t, typename acc_t>
Problem<in_t, acc_t> problem(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                             const at::Tensor& C, const std::optional<at::Tensor>& D,
                             const std::optional<at::Tensor>& bias, bool softplus, bool ss2d, const int32_t* pos) {
  Problem<in_t, acc_t> P{};
  P.u = u.data_ptr<in_t>();
  P.delta = delta.data_ptr<in_t>();
  P.B = B.data_ptr<in_t>();
  P.C = C.data_ptr<in_t>();
  P.A = A.data_ptr<acc_t>();
  P.D = D && D->defined() ? D->data_ptr<acc_t>() : nullptr;
  P.bias = bias && bias->defined() ? bias->data_ptr<acc_t>() : nullptr;
  for (int i = 0; i < 4; ++i) P.su[i] = u.stride(i);
  for (int i = 0; i < 5; ++i) {
    P.sd[i] = delta.stride(i);
    P.sb[i] = B.stride(i);
    P.sc[i] = C.stride(i);
  }
  P.Bb = delta.size(0);
  P.KG = delta.size(1);
  P.Dg = delta.size(2);
  P.N = A.size(1);
  P.NP = padded_states(P.N, std::is_same_v<acc_t, float>);
  P.H = delta.size(3);
  P.W = delta.size(4);
  P.L = P.H * P.W;
  P.nblk = (P.Dg + V - 1) / V;
  P.ss2d = ss2d;
  P.softplus = softplus;
  P.pos = pos;
  return P;
}

void check(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
           const at::Tensor& C, bool ss2d) {
  TORCH_CHECK(u.device().is_cpu(), "the cpp scan runs on CPU tensors");
  TORCH_CHECK(u.dim() == 4 && delta.dim() == 5 && B.dim() == 5 && C.dim() == 5 && A.dim() == 2, "bad ranks");
  TORCH_CHECK(u.scalar_type() == delta.scalar_type() && B.scalar_type() == u.scalar_type() &&
                  C.scalar_type() == u.scalar_type(), "u, delta, B, C must share a dtype");
  const int64_t KG = delta.size(1), Dg = delta.size(2);
  TORCH_CHECK(u.size(1) == (ss2d ? Dg : KG * Dg), "channels of u and delta disagree");
  TORCH_CHECK(A.size(0) == KG * Dg && A.is_contiguous(), "A must be (KG*Dg, N) contiguous");
  TORCH_CHECK(B.size(2) == A.size(1) && C.size(2) == A.size(1), "d_state of A and B/C disagree");
  TORCH_CHECK(delta.size(3) * delta.size(4) < (int64_t(1) << 31), "too many positions");
}

at::Tensor scan_fwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                    const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& bias,
                    bool softplus, bool ss2d, at::Tensor y) {
  check(u, delta, A, B, C, ss2d);
  const auto pos = scan_orders(ss2d, delta.size(3), delta.size(4));
  const int64_t sy[4] = {y.stride(0), y.stride(1), y.stride(2), y.stride(3)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, u.scalar_type(), "scan_fwd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    TORCH_CHECK(y.scalar_type() == c10::CppTypeToScalarType<acc_t>::value, "y must be in the accumulation dtype");
    auto P = problem<scalar_t, acc_t>(u, delta, A, B, C, D, bias, softplus, ss2d, pos.data());
    const auto bc = bc_rows(P);
    P.bc = bc.data();
    run_forward(P, y.data_ptr<acc_t>(), sy);
  });
  return y;
}

// Writes du and ddelta (preallocated, any strides); returns dA, dB, dC (contiguous, (Bb, KG, N, H, W)), dD, dbias.
std::vector<at::Tensor> scan_bwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                 const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                                 const std::optional<at::Tensor>& bias, bool softplus, bool ss2d,
                                 const at::Tensor& dy, at::Tensor du, at::Tensor ddelta) {
  check(u, delta, A, B, C, ss2d);
  const auto pos = scan_orders(ss2d, delta.size(3), delta.size(4));
  const int64_t Bb = delta.size(0), KG = delta.size(1), Dg = delta.size(2), N = A.size(1);
  const int64_t H = delta.size(3), W = delta.size(4), nblk = (Dg + V - 1) / V;
  const auto opts = A.options();
  auto dBp = at::empty({nblk, Bb, KG, N, H, W}, opts), dCp = at::empty({nblk, Bb, KG, N, H, W}, opts);
  auto dAp = at::empty({Bb, KG * Dg, N}, opts), dDp = at::empty({Bb, KG * Dg}, opts);
  auto dbp = at::empty({Bb, KG * Dg}, opts);
  const int64_t sdy[4] = {dy.stride(0), dy.stride(1), dy.stride(2), dy.stride(3)};
  const int64_t sdu[4] = {du.stride(0), du.stride(1), du.stride(2), du.stride(3)};
  const int64_t sdd[5] = {ddelta.stride(0), ddelta.stride(1), ddelta.stride(2), ddelta.stride(3), ddelta.stride(4)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, u.scalar_type(), "scan_bwd", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    TORCH_CHECK(A.scalar_type() == acc && dy.scalar_type() == acc && du.scalar_type() == acc &&
                    ddelta.scalar_type() == acc, "A, dy, du, ddelta must be in the accumulation dtype");
    auto P = problem<scalar_t, acc_t>(u, delta, A, B, C, D, bias, softplus, ss2d, pos.data());
    const auto bc = bc_rows(P);
    P.bc = bc.data();
    run_backward(P, dy.data_ptr<acc_t>(), sdy, du.data_ptr<acc_t>(), sdu, ddelta.data_ptr<acc_t>(), sdd,
                 dBp.data_ptr<acc_t>(), dCp.data_ptr<acc_t>(), dAp.data_ptr<acc_t>(), dDp.data_ptr<acc_t>(),
                 dbp.data_ptr<acc_t>());
  });
  auto dB = nblk == 1 ? dBp[0] : dBp.sum(0);
  auto dC = nblk == 1 ? dCp[0] : dCp.sum(0);
  return {dAp.sum(0), dB, dC, dDp.sum(0), dbp.sum(0)};
}

// The forward's arithmetic alone, for the benchmark: ``elements`` (channel, position, direction) steps of
// softplus(delta + bias), then per state a = exp(dt A), h = a h + dt u B, y += C h, with the kernel's own math on a
// 16 KiB working set that stays in L1, so no time goes to memory. Returns milliseconds (best of ``reps``): how
// fast this CPU can do the scan's math at all, the floor under any memory layout.
double arithmetic_floor_ms(int64_t elements, int64_t n_states, int64_t reps) {
  TORCH_CHECK(elements > 0 && n_states > 0 && reps > 0, "elements, n_states and reps must be positive");
  constexpr int P = 128;  // positions in the working set: 2 x 128 x 16 floats
  const int nt = threads_for(elements / (P * V) + 1);
  const int64_t iters = std::max<int64_t>(1, elements / (int64_t(P) * V * nt));
  double best = 1e30;
  float sink = 0.f;
  for (int64_t rep = 0; rep < reps; ++rep) {
    const double t0 = omp_get_wtime();
#pragma omp parallel num_threads(nt) reduction(+ : sink)
    {
      alignas(64) float z[P][V], u[P][V], y[V] = {}, A[V], bias[V];
      std::vector<float> h(n_states * V, 0.f);
      for (int p = 0; p < P; ++p)
        for (int c = 0; c < V; ++c) {
          z[p][c] = 0.5f * std::sin(0.37f * p + c) - 1.f;
          u[p][c] = std::cos(p + 0.1f * c);
        }
      for (int c = 0; c < V; ++c) {
        A[c] = -1.f - 0.03f * c;
        bias[c] = 0.1f;
      }
      for (int64_t it = 0; it < iters; ++it)
        for (int p = 0; p < P; ++p) {
          alignas(64) float dt[V], du[V];
#pragma omp simd
          for (int c = 0; c < V; ++c) {
            float g;
            softplus(z[p][c] + bias[c], dt[c], g);
            du[c] = dt[c] * u[p][c];
          }
          for (int64_t n = 0; n < n_states; ++n) {
            float* hn = h.data() + n * V;
#pragma omp simd
            for (int c = 0; c < V; ++c) {
              const float hv = fexp(dt[c] * A[c]) * hn[c] + du[c] * 0.7f;
              hn[c] = hv;
              y[c] += hv * 0.3f;
            }
          }
        }
      for (int c = 0; c < V; ++c) sink += y[c];
    }
    best = std::min(best, omp_get_wtime() - t0);
  }
  TORCH_CHECK(std::isfinite(sink), "arithmetic floor: non-finite result");  // keeps the work from being elided
  return 1e3 * best * double(elements) / double(iters * P * V * nt);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("scan_fwd", &scan_fwd, "fused selective scan / SS2D scan, forward (writes y)");
  m.def("scan_bwd", &scan_bwd, "its backward (writes du, ddelta; returns dA, dB, dC, dD, dbias)");
  m.def("arithmetic_floor_ms", &arithmetic_floor_ms, "ms for the forward's math alone on L1-resident data");
}
