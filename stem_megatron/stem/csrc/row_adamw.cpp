// In-place AdamW on selected rows of a [V, d] fp32 table and its two moments.
//
// Each selected row is read once and written once (p, exp_avg, exp_avg_sq in place; grad
// read): no gathered copies, no scatter. Rows are spread over OpenMP threads; within a row
// the work goes in L1-sized chunks, vectorised by the compiler.
//
// The step follows torch.optim.AdamW's single-tensor path op for op, in fp32:
//   p = p * (1 - lr wd);  m = lerp(m, g, 1 - beta1);  v = v * beta2 + ((1 - beta2) * g) * g
//   p = p + (-step_size * m) / (sqrt(v) / sqrt(bc2) + eps)
//
// Exact mode first settles the idle steps a row owes (as dense AdamW with zero gradients
// would have moved it). With k owed steps from step t0, J = min(k, tail) of them move the
// row, the rest only decay it. In closed form, with s = sqrt(v0):
//   p = p0 * D(t0, t0 + k) - m0 * sum_{j=1..J} w_j / (a_j s + eps)
//   w_j = step_size(t0 + j) * beta1'^j * D(t0 + j, t0 + k),  a_j = beta2'^(j/2) / sqrt(bc2(t0 + j))
//   m = m0 * beta1'^k,  v = v0 * beta2'^k
// where D(a, b) is the product of the weight-decay factors of steps a+1..b. The sum has a
// per-element s, so it cannot be precomputed per row as is; but a_j falls monotonically, so
// the j split into a few groups of nearly equal a_j (spread rho <= 0.1), and around a group's
// centre a*: 1 / (a_j s + eps) = r * sum_k (-delta_j q)^k with r = 1 / (a* s + eps),
// q = a* s r in [0, 1), delta_j = a_j / a* - 1. That series converges for every s; a group
// of spread rho keeps the K <= 8 terms that leave rho^K / (1 - rho) < 2^-27 relative error
// per term (rho = 0.1: 8 terms; a short debt late in training: 2 or 3). Per element and
// group: one division and K FMAs, instead of up to `tail` replayed steps with a sqrt and a
// division each. Group coefficients C_k = sum_j w_j delta_j^k are computed per row in double.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kChunk = 256;  // elements per array per pass: 3 KB of p, m, v stay in L1
constexpr int kTerms = 8;
constexpr double kSpread = 0.1;
constexpr double kSeriesTol = 1.0 / (1 << 27);

struct StepArgs {
  float wd_factor;       // fp32(1 - lr * weight_decay)
  float lerp_weight;     // fp32(1 - beta1)
  float beta2;           // fp32(beta2)
  float one_minus_beta2; // fp32(1 - beta2)
  float neg_step_size;   // fp32(-lr / bc1)
  float bc2_sqrt;        // fp32(sqrt(bc2))
  float eps;
};

struct SettleArgs {
  int64_t* settled;            // [V] step each row's state is current at; null: no settling
  int64_t upto;                // settle owed steps up to this step
  int64_t base;                // step index 0 of the arrays below
  const double* step_size;     // [steps], entry t - base - 1: lr_t / bc1_t
  const double* inv_bc2_sqrt;  // [steps], entry t - base - 1: 1 / sqrt(bc2_t)
  const double* decay;         // [steps], entry t - base - 1: fp32(1 - lr_t wd)
  const double* log_decay;     // [steps + 1], entry t - base: sum of log(decay) over base+1..t
  int64_t tail;                // idle steps that can still move a row
  double beta1_idle;           // m's factor per idle step
  double beta2_idle;           // v's factor per idle step
  float eps;
  int64_t settled_to;          // value written to settled[row] afterwards
};

struct Group {
  float centre;
  int terms;
  float coeff[kTerms];
};

// acc += r * sum_k C_k (-q)^k for one group, K terms (Horner).
template <int K>
inline void add_series(const Group& g, const float* v, float* acc, int64_t n, float eps) {
  const float as = g.centre;
#pragma omp simd
  for (int64_t e = 0; e < n; ++e) {
    const float x = as * std::sqrt(v[e]);
    const float r = 1.f / (x + eps);
    const float mq = -(x * r);
    float poly = g.coeff[K - 1];
    for (int i = K - 2; i >= 0; --i) poly = std::fma(poly, mq, g.coeff[i]);
    acc[e] += r * poly;
  }
}

// Per-row constants of the settling: decays and the grouped series coefficients.
struct RowSettle {
  float p_decay = 1.f, m_decay = 1.f, v_decay = 1.f;
  std::vector<Group> groups;
  std::vector<double> w, a;

  bool prepare(const SettleArgs& s, int64_t t0) {
    const int64_t k = s.upto - t0;
    groups.clear();
    if (k <= 0) return false;
    const int64_t J = std::min(k, s.tail);
    const double* L = s.log_decay - s.base;  // L[t]
    p_decay = static_cast<float>(std::exp(L[t0 + k] - L[t0]));
    m_decay = static_cast<float>(std::pow(s.beta1_idle, static_cast<double>(k)));
    v_decay = static_cast<float>(std::pow(s.beta2_idle, static_cast<double>(k)));
    w.resize(J + 1);
    a.resize(J + 1);
    const double* step_size = s.step_size - s.base - 1;
    const double* inv_bc2 = s.inv_bc2_sqrt - s.base - 1;
    const double* decay = s.decay - s.base - 1;
    // Backwards, so the weight decay after step t0 + j accumulates by one factor per j.
    double post = std::exp(L[t0 + k] - L[t0 + J]);
    double b1 = std::pow(s.beta1_idle, static_cast<double>(J));
    double b2h = std::pow(std::sqrt(s.beta2_idle), static_cast<double>(J));
    const double inv_b1 = 1.0 / s.beta1_idle, inv_b2h = 1.0 / std::sqrt(s.beta2_idle);
    for (int64_t j = J; j >= 1; --j) {
      const int64_t t = t0 + j;
      w[j] = step_size[t] * b1 * post;
      a[j] = b2h * inv_bc2[t];
      post *= decay[t];
      b1 *= inv_b1;
      b2h *= inv_b2h;
    }
    for (int64_t lo = 1; lo <= J;) {
      int64_t hi = lo;  // a falls with j: the group is a[lo] >= ... >= a[hi]
      while (hi < J && a[lo] - a[hi + 1] <= kSpread * (a[lo] + a[hi + 1])) ++hi;
      const double centre = 0.5 * (a[lo] + a[hi]);
      const double spread = (a[lo] - a[hi]) / (a[lo] + a[hi]);
      int terms = 1;
      for (double bound = spread / (1 - spread); terms < kTerms && bound >= kSeriesTol; ++terms) bound *= spread;
      double c[kTerms] = {};
      for (int64_t j = lo; j <= hi; ++j) {
        const double delta = a[j] / centre - 1.0;
        double term = w[j];
        for (int i = 0; i < terms; ++i) { c[i] += term; term *= delta; }
      }
      Group g;
      g.centre = static_cast<float>(centre);
      g.terms = terms;
      for (int i = 0; i < terms; ++i) g.coeff[i] = static_cast<float>(c[i]);
      groups.push_back(g);
      lo = hi + 1;
    }
    return true;
  }

  void apply(float* p, float* m, float* v, int64_t n, float eps) const {
    float acc[kChunk];
    std::fill(acc, acc + n, 0.f);
    for (const Group& g : groups) {
      switch (g.terms) {  // a compile-time length per case, so the element loop vectorises
        case 1: add_series<1>(g, v, acc, n, eps); break;
        case 2: add_series<2>(g, v, acc, n, eps); break;
        case 3: add_series<3>(g, v, acc, n, eps); break;
        case 4: add_series<4>(g, v, acc, n, eps); break;
        case 5: add_series<5>(g, v, acc, n, eps); break;
        case 6: add_series<6>(g, v, acc, n, eps); break;
        case 7: add_series<7>(g, v, acc, n, eps); break;
        default: add_series<kTerms>(g, v, acc, n, eps);
      }
    }
#pragma omp simd
    for (int64_t e = 0; e < n; ++e) {
      // With eps = 0, a row with v = 0 gets 0 * inf = NaN here, as in dense AdamW's 0 / 0.
      p[e] = p[e] * p_decay - m[e] * acc[e];
      m[e] = m[e] * m_decay;
      v[e] = v[e] * v_decay;
    }
  }
};

inline void adamw_chunk(float* p, float* m, float* v, const float* g, int64_t n, const StepArgs& a) {
  const bool small = a.lerp_weight < 0.5f;  // torch's lerp picks its formula by the weight
  const float coeff = small ? a.lerp_weight : a.lerp_weight - 1.f;
#pragma omp simd
  for (int64_t e = 0; e < n; ++e) {
    const float pe = p[e] * a.wd_factor;
    const float me = std::fma(coeff, g[e] - m[e], small ? m[e] : g[e]);
    const float ve = std::fma(a.one_minus_beta2 * g[e], g[e], v[e] * a.beta2);  // as torch's addcmul
    const float denom = std::sqrt(ve) / a.bc2_sqrt + a.eps;
    p[e] = pe + (a.neg_step_size * me) / denom;
    m[e] = me;
    v[e] = ve;
  }
}

}  // namespace

extern "C" {

// Settle (when settle->settled is set) and then step (when grad is set) rows ids[0..n) of the
// [V, d] row-major tables. grad is [n, d] row-major, in the order of ids. ids must be unique.
void stem_row_adamw(float* param, float* exp_avg, float* exp_avg_sq, int64_t d, const int64_t* ids,
                    int64_t n, const float* grad, const StepArgs* step, const SettleArgs* settle,
                    int num_threads) {
  // Rows idle since the same step share their settling constants: prepare each start once.
  std::vector<int64_t> starts;
  std::vector<RowSettle> settles;
  std::vector<char> owes;
  if (settle->settled != nullptr) {
    starts.resize(n);
    for (int64_t i = 0; i < n; ++i) starts[i] = settle->settled[ids[i]];
    std::sort(starts.begin(), starts.end());
    starts.erase(std::unique(starts.begin(), starts.end()), starts.end());
    const int64_t count = static_cast<int64_t>(starts.size());
    settles.resize(count);
    owes.resize(count);
#pragma omp parallel for schedule(dynamic) num_threads(num_threads) if (count >= 16)
    for (int64_t k = 0; k < count; ++k) owes[k] = settles[k].prepare(*settle, starts[k]);
  }
  // Small updates stay on the calling thread: waking the team costs more than they do.
#pragma omp parallel for schedule(dynamic, 4) num_threads(num_threads) if (n * d >= (1 << 16))
  for (int64_t i = 0; i < n; ++i) {
    const int64_t row = ids[i];
    float* p = param + row * d;
    float* m = exp_avg + row * d;
    float* v = exp_avg_sq + row * d;
    const RowSettle* rs = nullptr;
    if (settle->settled != nullptr) {
      const auto k = std::lower_bound(starts.begin(), starts.end(), settle->settled[row]) - starts.begin();
      if (owes[k]) rs = &settles[k];
      settle->settled[row] = settle->settled_to;
    }
    for (int64_t c = 0; c < d; c += kChunk) {
      const int64_t len = std::min(kChunk, d - c);
      if (rs != nullptr) rs->apply(p + c, m + c, v + c, len, settle->eps);
      if (grad != nullptr) adamw_chunk(p + c, m + c, v + c, grad + i * d + c, len, *step);
    }
  }
}

}  // extern "C"
