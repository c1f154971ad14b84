// CPU kernels of PortableSyncBN's per-call arithmetic (mmdet_bnplug/layers/portable_sync_bn.py
// holds the layer, its autograd rule, the collectives and the PyTorch implementation that
// serves every other device, torch.compile, and CPU builds without this extension).
//
// Three functions, each replacing a chain of small per-channel tensor ops whose Python
// dispatch dominates on small feature maps (FPN P6/P7), and one pass over memory:
// - local_stats: this rank's row [count, mean, M2] for the all_gather;
// - combine: the group's mean, biased variance, invstd and count from the gathered rows
//   (Chan et al.), and the running statistics' update (in place, masked as the layer's
//   _commit: nothing changes unless the update is finite and the group has > 1 value);
// - grad_input: BN's input gradient from the group's sums of dy and dy * xhat, in one
//   pass over dy and x (two in the PyTorch implementation).
#include <torch/extension.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "cpu_common.h"

namespace {

using at::Tensor;
using bnplug::check_input;
using bnplug::check_stat;
using bnplug::stat_dtype;

// (1, 2C + 1) in the statistics dtype: [n, mean (C), M2 (C)] of x (N, C, *), where n is
// the element count per channel and M2 the sum of squared deviations from the mean.
// fp32/fp64: BN's statistics kernel (one fused pass); fp16/bf16: two passes in fp32 (that
// kernel would round the statistics to the input's precision). An empty x gives zeros.
Tensor local_stats(const Tensor& x) {
  const char* op = "sync_bn local_stats";
  check_input(op, x, -1);
  const int64_t C = x.size(1), n = C ? x.numel() / C : 0;
  const auto sd = stat_dtype(x);
  Tensor row = at::zeros({1, 2 * C + 1}, x.options().dtype(sd));
  if (n == 0) return row;
  Tensor mean, m2;
  if (x.scalar_type() == sd) {
    std::tie(mean, m2) = at::batch_norm_update_stats(x, std::nullopt, std::nullopt, 0.0);
    m2 = m2.mul_(static_cast<double>(n));  // biased variance -> M2
  } else {
    std::vector<int64_t> dims{0};
    for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
    const Tensor xs = x.to(sd);
    mean = xs.sum(dims).div_(static_cast<double>(n));
    m2 = (xs - bnplug::channel_view(mean, x.dim())).square_().sum(dims);
  }
  AT_DISPATCH_FLOATING_TYPES(sd, "sync_bn", [&] {
    scalar_t* r = row.mutable_data_ptr<scalar_t>();
    const scalar_t* mp = mean.const_data_ptr<scalar_t>();
    const scalar_t* vp = m2.const_data_ptr<scalar_t>();
    r[0] = static_cast<scalar_t>(n);
    std::copy(mp, mp + C, r + 1);
    std::copy(vp, vp + C, r + 1 + C);
  });
  return row;
}

// From the gathered rows (W, 2C + 1) (local_stats of each rank): the group's mean, biased
// variance, 1 / sqrt(var + eps) (each (C,)), and count (a 0-dim tensor, and as an int).
// An empty group batch gives mean and variance 0. With running statistics given (the
// layer's buffers, (C,) each, and its int64 counter), updates them as BN on the group's
// batch: running = running + m * (new - running), variance unbiased, m = momentum or, when
// None, 1 / (num_batches_tracked + 1); then the counter is advanced. Nothing is written
// unless the group has more than one value and both updated statistics are finite.
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
    for (int64_t c = 0; c < C; ++c) {
      T acc = 0;
      for (int64_t w = 0; w < W; ++w) acc += g[w * stride] * g[w * stride + 1 + c];
      const T mu = acc / safe;
      T m2 = 0;
      for (int64_t w = 0; w < W; ++w) {
        const T d = g[w * stride + 1 + c] - mu;
        m2 += g[w * stride + 1 + C + c] + g[w * stride] * d * d;
      }
      mp[c] = mu;
      vp[c] = m2 / safe;
      ip[c] = T(1) / std::sqrt(vp[c] + static_cast<T>(eps));
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

// BN's input gradient on the group's batch, this rank's slice:
// dx = w * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)), xhat = (x - mean) * invstd,
// from sums = [sum(dy) (C), sum(dy * xhat) (C)] over the group and its element count; in
// x's dtype and memory format, one pass.
Tensor grad_input(const Tensor& dy, const Tensor& x, const Tensor& mean, const Tensor& invstd,
                  const std::optional<Tensor>& weight, const Tensor& sums, const Tensor& count) {
  const char* op = "sync_bn grad_input";
  check_input(op, x, -1);
  const int64_t C = x.size(1);
  const auto sd = stat_dtype(x);
  const Tensor mu = check_stat(op, "mean", mean, sd, {C});
  const Tensor inv = check_stat(op, "invstd", invstd, sd, {C});
  const Tensor s = check_stat(op, "sums", sums, sd, {2 * C});
  const auto w = bnplug::checked_param(op, "weight", weight, x);
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
  m.def("grad_input", &grad_input, "BN's input gradient from the group's sums, one pass",
        pybind11::arg("dy"), pybind11::arg("x"), pybind11::arg("mean"),
        pybind11::arg("invstd"), pybind11::arg("weight"), pybind11::arg("sums"),
        pybind11::arg("count"));
}
