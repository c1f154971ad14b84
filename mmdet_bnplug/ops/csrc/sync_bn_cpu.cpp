// CPU kernels of PortableSyncBN's per-call arithmetic (mmdet_bnplug/layers/portable_sync_bn.py
// holds the layer, its autograd rule, the collectives and the PyTorch implementation that
// serves every other device, torch.compile, and CPU builds without this extension).
//
// Four functions, each at most one pass over memory, replacing either a chain of small
// per-channel tensor ops (whose Python dispatch dominates on small feature maps, FPN
// P6/P7) or an ATen kernel that costs more passes or loses a large mean's precision:
// - local_stats: this rank's row [count, mean, M2] for the all_gather;
// - combine: the group's mean, biased variance, invstd and count from the gathered rows
//   (Chan et al.), and the running statistics' update (in place, masked as the layer's
//   _commit: nothing changes unless the update is finite and the group has > 1 value);
// - normalize: the output from the group's statistics, in one pass over x;
// - grad_input: BN's input gradient from the group's sums of dy and dy * xhat, in one
//   pass over dy and x (two in the PyTorch implementation).
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu_common.h"

namespace {

using at::Tensor;
using bnplug::check_input;
using bnplug::check_stat;
using bnplug::stat_dtype;

// Values per float accumulator lane between flushes into double: keeps a plane's sums
// within float rounding of blocks this long, not of the whole plane.
constexpr int64_t kFlushEvery = 256;

// Adds sum(d) and sum(d * d), d = p[i] - k over p[0, len), into (s1, s2), in lanes of the
// opmath type S (vectorised by the compiler) flushed into double every kFlushEvery values
// per lane.
template <typename T, typename S>
void add_shifted_sums(const T* __restrict__ p, int64_t len, S k, double& s1, double& s2) {
  constexpr int kLanes = 16;
  const int64_t block = kLanes * kFlushEvery;
  for (int64_t start = 0; start < len; start += block) {
    const int64_t end = std::min(len, start + block);
    S a1[kLanes] = {}, a2[kLanes] = {};
    int64_t i = start;
    for (; i + kLanes <= end; i += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const S d = static_cast<S>(p[i + l]) - k;
        a1[l] += d;
        a2[l] += d * d;
      }
    }
    double b1 = 0, b2 = 0;
    for (; i < end; ++i) {
      const double d = static_cast<S>(p[i]) - k;
      b1 += d;
      b2 += d * d;
    }
    for (int l = 0; l < kLanes; ++l) {
      b1 += a1[l];
      b2 += a2[l];
    }
    s1 += b1;
    s2 += b2;
  }
}

// Same over rows [begin, end) of C values (channels-last): per channel c, into s1[c], s2[c].
template <typename T, typename S>
void add_shifted_row_sums(const T* __restrict__ p, int64_t begin, int64_t end, int64_t C,
                          const S* __restrict__ k, double* s1, double* s2) {
  std::vector<S> a1(C), a2(C);
  for (int64_t start = begin; start < end; start += kFlushEvery) {
    std::fill(a1.begin(), a1.end(), S(0));
    std::fill(a2.begin(), a2.end(), S(0));
    for (int64_t r = start; r < std::min(end, start + kFlushEvery); ++r) {
      const T* __restrict__ row = p + r * C;
      for (int64_t c = 0; c < C; ++c) {
        const S d = static_cast<S>(row[c]) - k[c];
        a1[c] += d;
        a2[c] += d * d;
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      s1[c] += a1[c];
      s2[c] += a2[c];
    }
  }
}

// (1, 2C + 1) in the statistics dtype: [n, mean (C), M2 (C)] of x (N, C, *), where n is
// the element count per channel and M2 the sum of squared deviations from the mean; any
// floating dtype, contiguous or channels-last. One pass over x: per channel the sums of
// d = x - k and d^2, with k the channel's first value, so that a large mean against a small
// spread keeps its precision; mean = k + sum(d) / n, M2 = sum(d^2) - sum(d)^2 / n.
// Deterministic (a fixed order of additions, whatever the thread count). An empty x gives
// zeros.
Tensor local_stats(const Tensor& x) {
  const char* op = "sync_bn local_stats";
  check_input(op, x, -1);
  const int64_t N = x.size(0), C = x.size(1), n = C ? x.numel() / C : 0;
  const auto sd = stat_dtype(x);
  Tensor row = at::zeros({1, 2 * C + 1}, x.options().dtype(sd));
  if (n == 0) return row;
  const auto fmt = x.dim() > 2 ? x.suggest_memory_format() : at::MemoryFormat::Contiguous;
  const Tensor xc = x.contiguous(fmt);
  const int64_t inner = n / N;
  std::vector<double> s1(C, 0.0), s2(C, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sync_bn", [&] {
    using T = scalar_t;
    using S = at::opmath_type<T>;
    const T* xp = xc.const_data_ptr<T>();
    std::vector<S> k(C);
    if (fmt == at::MemoryFormat::Contiguous) {  // planes of `inner` values, one channel each
      for (int64_t c = 0; c < C; ++c) k[c] = static_cast<S>(xp[c * inner]);
      const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / n);
      at::parallel_for(0, C, grain, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c)
          for (int64_t i = 0; i < N; ++i)
            add_shifted_sums(xp + (i * C + c) * inner, inner, k[c], s1[c], s2[c]);
      });
    } else {  // rows of C values, one per position: a fixed number of parts, summed in order
      for (int64_t c = 0; c < C; ++c) k[c] = static_cast<S>(xp[c]);
      const int64_t rows = n, parts = std::min<int64_t>(64, (rows + 1023) / 1024);
      std::vector<double> p1(parts * C, 0.0), p2(parts * C, 0.0);
      at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
        for (int64_t q = begin; q < end; ++q)
          add_shifted_row_sums(xp, rows * q / parts, rows * (q + 1) / parts, C, k.data(),
                               p1.data() + q * C, p2.data() + q * C);
      });
      for (int64_t q = 0; q < parts; ++q)
        for (int64_t c = 0; c < C; ++c) {
          s1[c] += p1[q * C + c];
          s2[c] += p2[q * C + c];
        }
    }
    AT_DISPATCH_FLOATING_TYPES(sd, "sync_bn", [&] {
      scalar_t* r = row.mutable_data_ptr<scalar_t>();
      r[0] = static_cast<scalar_t>(n);
      for (int64_t c = 0; c < C; ++c) {
        const double shifted_mean = s1[c] / static_cast<double>(n);
        r[1 + c] = static_cast<scalar_t>(static_cast<double>(k[c]) + shifted_mean);
        r[1 + C + c] = static_cast<scalar_t>(std::max(s2[c] - s1[c] * shifted_mean, 0.0));
      }
    });
  });
  return row;
}

// From the gathered rows (W, 2C + 1) (local_stats of each rank): the group's mean, biased
// variance, 1 / sqrt(var + eps) (each (C,)), and count (a 0-dim tensor, and as an int).
// Computed in double, each rank's mean taken relative to that of the rank with the most
// values (a large mean against a small spread keeps its precision: one rank's statistics
// come back as they went). An empty group batch gives mean and variance 0. With running
// statistics given (the layer's buffers, (C,) each, and its int64 counter), updates them
// as BN on the group's batch: running = running + m * (new - running), variance unbiased,
// m = momentum or, when None, 1 / (num_batches_tracked + 1); then the counter is advanced.
// Nothing is written unless the group has more than one value and both updated statistics
// are finite.
std::tuple<Tensor, Tensor, Tensor, Tensor, int64_t> combine(
    const Tensor& gathered, double eps, const std::optional<Tensor>& running_mean,
    const std::optional<Tensor>& running_var, const std::optional<Tensor>& counter,
    std::optional<double> momentum) {
  const char* op = "sync_bn combine";
  TORCH_CHECK(gathered.is_cpu() && gathered.dim() == 2 && gathered.size(1) % 2 == 1 &&
                  gathered.is_contiguous(),
              op, ": gathered must be a contiguous CPU tensor (ranks, 2C + 1), got ",
              gathered.sizes());
  const auto sd = gathered.scalar_type();
  TORCH_CHECK(sd == at::kFloat || sd == at::kDouble, op,
              ": gathered must be float32 or float64, got ", sd);
  const int64_t W = gathered.size(0), C = (gathered.size(1) - 1) / 2;
  const bool update = running_mean.has_value();
  TORCH_CHECK(update == running_var.has_value() && update == counter.has_value(), op,
              ": running_mean, running_var and num_batches_tracked go together");
  Tensor mean = at::empty({C}, gathered.options()), var = at::empty_like(mean),
         invstd = at::empty_like(mean), count = at::empty({}, gathered.options());
  int64_t total = 0;
  AT_DISPATCH_FLOATING_TYPES(sd, "sync_bn", [&] {
    using T = scalar_t;
    const T* g = gathered.const_data_ptr<T>();
    const int64_t stride = 2 * C + 1;
    T n = 0;
    for (int64_t w = 0; w < W; ++w) n += g[w * stride];
    total = static_cast<int64_t>(std::llround(static_cast<double>(n)));
    const T safe = std::max(n, T(1));
    T* mp = mean.mutable_data_ptr<T>();
    T* vp = var.mutable_data_ptr<T>();
    T* ip = invstd.mutable_data_ptr<T>();
    int64_t largest = 0;  // the reference row: the rank with the most values
    for (int64_t w = 1; w < W; ++w)
      if (g[w * stride] > g[largest * stride]) largest = w;
    for (int64_t c = 0; c < C; ++c) {  // in double, means relative to the reference's
      const double ref = g[largest * stride + 1 + c];
      double acc = 0;
      for (int64_t w = 0; w < W; ++w)
        acc += static_cast<double>(g[w * stride]) * (g[w * stride + 1 + c] - ref);
      const double mu = ref + acc / safe;
      double m2 = 0;
      for (int64_t w = 0; w < W; ++w) {
        const double d = g[w * stride + 1 + c] - mu;
        m2 += static_cast<double>(g[w * stride + 1 + C + c]) + g[w * stride] * d * d;
      }
      mp[c] = static_cast<T>(mu);
      vp[c] = static_cast<T>(m2 / safe);
      ip[c] = static_cast<T>(1.0 / std::sqrt(m2 / safe + eps));
    }
    *count.mutable_data_ptr<T>() = n;
  });
  if (update && total > 1) {
    TORCH_CHECK(counter->is_cpu() && counter->scalar_type() == at::kLong &&
                    counter->numel() == 1,
                op, ": num_batches_tracked must be an int64 CPU tensor of one element");
    const Tensor rm = check_stat(op, "running_mean", *running_mean, sd, {C});
    const Tensor rv = check_stat(op, "running_var", *running_var, sd, {C});
    const int64_t tracked = *counter->const_data_ptr<int64_t>();
    const double m = momentum ? *momentum : 1.0 / (static_cast<double>(tracked) + 1.0);
    const Tensor new_rm = at::empty_like(rm), new_rv = at::empty_like(rv);
    bool finite = true;
    AT_DISPATCH_FLOATING_TYPES(sd, "sync_bn", [&] {
      using T = scalar_t;
      const T unbias = static_cast<T>(total) / static_cast<T>(total - 1);
      const T* rmp = rm.const_data_ptr<T>();
      const T* rvp = rv.const_data_ptr<T>();
      const T* mp = mean.const_data_ptr<T>();
      const T* vp = var.const_data_ptr<T>();
      T* a = new_rm.mutable_data_ptr<T>();
      T* b = new_rv.mutable_data_ptr<T>();
      for (int64_t c = 0; c < C; ++c) {
        a[c] = rmp[c] + static_cast<T>(m) * (mp[c] - rmp[c]);
        b[c] = rvp[c] + static_cast<T>(m) * (vp[c] * unbias - rvp[c]);
        finite = finite && std::isfinite(a[c]) && std::isfinite(b[c]);
      }
    });
    if (finite) {
      bnplug::written(*running_mean, new_rm);
      bnplug::written(*running_var, new_rv);
      *counter->mutable_data_ptr<int64_t>() += 1;
      counter->unsafeGetTensorImpl()->bump_version();
    }
  }
  return {mean, var, invstd, count, total};
}

// The checked per-channel arguments of normalize and grad_input for input x (N, C, *):
// mean, invstd and the optional weight, (C,) each in the statistics dtype.
struct Normalisation {
  Tensor mean, invstd;
  std::optional<Tensor> weight;
  Normalisation(const char* op, const Tensor& x, const Tensor& mean_, const Tensor& invstd_,
                const std::optional<Tensor>& weight_) {
    check_input(op, x, -1);
    const auto sd = stat_dtype(x);
    mean = check_stat(op, "mean", mean_, sd, {x.size(1)});
    invstd = check_stat(op, "invstd", invstd_, sd, {x.size(1)});
    weight = bnplug::checked_param(op, "weight", weight_, x);
  }
};

// BN's output with given statistics: y = (x - mean) * invstd * w + b (w, b absent: 1, 0),
// in x's dtype and memory format, one pass. x - mean is taken first (torch's CPU eval
// kernel computes x * alpha + beta, which loses a large mean's precision).
Tensor normalize(const Tensor& x, const Tensor& mean, const Tensor& invstd,
                 const std::optional<Tensor>& weight, const std::optional<Tensor>& bias) {
  const char* op = "sync_bn normalize";
  const Normalisation z(op, x, mean, invstd, weight);
  const auto b = bnplug::checked_param(op, "bias", bias, x);
  return bnplug::channel_affine2(op, std::nullopt, x, std::nullopt,
                                 z.weight ? z.invstd * *z.weight : z.invstd, z.mean, b);
}

// BN's input gradient on the group's batch, this rank's slice:
// dx = w * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)), xhat = (x - mean) * invstd,
// from sums = [sum(dy) (C), sum(dy * xhat) (C)] over the group and its element count; in
// x's dtype and memory format, one pass.
Tensor grad_input(const Tensor& dy, const Tensor& x, const Tensor& mean, const Tensor& invstd,
                  const std::optional<Tensor>& weight, const Tensor& sums, const Tensor& count) {
  const char* op = "sync_bn grad_input";
  const Normalisation z(op, x, mean, invstd, weight);
  const int64_t C = x.size(1);
  const auto sd = stat_dtype(x);
  const Tensor &mu = z.mean, &inv = z.invstd;
  const auto& w = z.weight;
  const Tensor s = check_stat(op, "sums", sums, sd, {2 * C});
  TORCH_CHECK(count.is_cpu() && count.numel() == 1, op, ": count must be a CPU scalar");
  Tensor a = at::empty({C}, mu.options()), k = at::empty_like(a), shift = at::empty_like(a);
  AT_DISPATCH_FLOATING_TYPES(sd, "sync_bn", [&] {
    using T = scalar_t;
    const T n = std::max(count.to(sd).item<T>(), T(1));
    const T* ip = inv.const_data_ptr<T>();
    const T* sp = s.const_data_ptr<T>();
    const T* wp = w ? w->const_data_ptr<T>() : nullptr;
    T* ap = a.mutable_data_ptr<T>();
    T* kp = k.mutable_data_ptr<T>();
    T* hp = shift.mutable_data_ptr<T>();
    for (int64_t c = 0; c < C; ++c) {  // dx = a * dy + k * (x - mean) + shift
      ap[c] = wp ? ip[c] * wp[c] : ip[c];
      kp[c] = -ap[c] * ip[c] * (sp[C + c] / n);
      hp[c] = -ap[c] * (sp[c] / n);
    }
  });
  return bnplug::channel_affine2(op, dy, x, a, k, mu, shift);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CPU kernels of PortableSyncBN (mmdet_bnplug/ops/csrc/sync_bn_cpu.cpp)";
  m.def("local_stats", &local_stats, "this rank's [count, mean, M2] row (1, 2C + 1)",
        pybind11::arg("x"));
  m.def("combine", &combine,
        "(mean, var, invstd, count, total) of the group; updates the running statistics",
        pybind11::arg("gathered"), pybind11::arg("eps"), pybind11::arg("running_mean"),
        pybind11::arg("running_var"), pybind11::arg("num_batches_tracked"),
        pybind11::arg("momentum"));
  m.def("normalize", &normalize, "BN's output with given statistics, one pass",
        pybind11::arg("x"), pybind11::arg("mean"), pybind11::arg("invstd"),
        pybind11::arg("weight"), pybind11::arg("bias"));
  m.def("grad_input", &grad_input, "BN's input gradient from the group's sums, one pass",
        pybind11::arg("dy"), pybind11::arg("x"), pybind11::arg("mean"),
        pybind11::arg("invstd"), pybind11::arg("weight"), pybind11::arg("sums"),
        pybind11::arg("count"));
}
