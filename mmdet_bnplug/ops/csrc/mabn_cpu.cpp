// CPU kernels of MABN's training-step ops (schemas, fake and PyTorch implementations and
// the Python autograd rule: mmdet_bnplug/ops/mabn.py), registered with the dispatcher for
// the CPU key, and the same autograd rule as a C++ node for the AutogradCPU key (Python's
// autograd wrapper costs as much as the arithmetic on small feature maps).
//
// Stateless: every input is a tensor or a scalar, and each kernel writes only the tensors
// its op's schema declares mutable (mabn_train_stats: running_var, num_batches_tracked,
// buffer_x2; mabn_train_backward: buffer_gz), bumping their version counters; a step
// whose statistics are not finite writes none of them (the non-finite guard, mabn.py).
//
// The arithmetic is that of the ops' PyTorch implementation: ATen's fused reductions and
// vectorised affine kernel, plain loops for the per-channel statistics, and the input
// gradient in one pass (channel_affine2, cpu_common.h; two passes in PyTorch). What this
// saves is the Python dispatch of ~20 small per-channel tensor ops per step, which
// dominates on small feature maps (FPN P6/P7), and one pass over memory in the backward.
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu_common.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;
using bnplug::channel_view;
using bnplug::check_input;
using bnplug::check_stat;
using bnplug::checked_param;
using bnplug::stat_dtype;
using bnplug::written;

// Rows of a step's per-channel coefficients, (2, C) in the statistics dtype.
enum Row { kQ = 0, kNegInvVar = 1 };  // r / sqrt(s2 + eps), -1 / (s2 + eps)

// An int64 CPU scalar: the counter t or a step's copy of it (reading it is no sync).
int64_t read_counter(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.is_cpu() && t.scalar_type() == at::kLong && t.numel() == 1, op, ": ", name,
              " must be an int64 CPU tensor of one element, got ", t.scalar_type(), " ",
              t.sizes(), " on ", t.device());
  return *t.const_data_ptr<int64_t>();
}

// The spec's phase of step t: batch statistics instead of the moving averages?
bool use_batch(int64_t t, int64_t buffer_size, int64_t warmup_iters) {
  return t <= buffer_size || t < warmup_iters;
}

// Every one of the C values finite? (The non-finite guard: see mabn.py.)
template <typename T>
bool all_finite(const T* value, int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    if (!std::isfinite(value[c])) return false;
  }
  return true;
}

// buffer[t % B][c] = value[c] for every channel if ``write``; returns, per channel, value
// (batch statistics) or the mean of the B rows (moving average), through
// ``per_channel(c, s)``.
template <typename T, typename F>
void record(const Tensor& buffer, int64_t t, bool batch, bool write, const T* value,
            F per_channel) {
  const int64_t rows = buffer.size(0), C = buffer.size(1);
  T* buf = buffer.mutable_data_ptr<T>();
  T* row = buf + (t % rows) * C;
  if (write) std::copy(value, value + C, row);
  for (int64_t c = 0; c < C; ++c) {
    T s = value[c];
    if (!batch) {
      T acc = 0;
      for (int64_t b = 0; b < rows; ++b) acc += buf[b * C + c];
      s = acc / static_cast<T>(rows);
    }
    per_channel(c, s);
  }
}

// Per-channel constants for BN's kernels, (C,) each in the statistics dtype: an identity
// mean (zeros) and variance (ones); one allocation, filled by a loop.
struct Consts {
  Tensor zeros, ones;
};

Consts make_consts(int64_t C, at::ScalarType dtype) {
  const Tensor both = at::empty({2, C}, at::TensorOptions().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES(dtype, "mabn_consts", [&] {
    scalar_t* p = both.mutable_data_ptr<scalar_t>();
    std::fill(p, p + C, scalar_t(0));
    std::fill(p + C, p + 2 * C, scalar_t(1));
  });
  return {both[0], both[1]};
}

// q[c] * w[c] per channel (q without affine); ``w`` in q's dtype.
Tensor scale_of(const Tensor& coeffs, const std::optional<Tensor>& w) {
  const Tensor q = coeffs[kQ];
  if (!w) return q;
  Tensor scale = at::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "mabn_scale", [&] {
    const scalar_t* qp = q.const_data_ptr<scalar_t>();
    const scalar_t* wp = w->const_data_ptr<scalar_t>();
    scalar_t* sp = scale.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < q.numel(); ++c) sp[c] = qp[c] * wp[c];
  });
  return scale;
}

// (weight * sum(a * b), sum(a) if wanted) per channel in one pass, any layout and
// dtype: BN's backward reduction with mean 0 and invstd ``weight`` (_dot_sums in mabn.py).
std::tuple<Tensor, Tensor> dot_sums(const Tensor& a, const Tensor& b, const Tensor& weight,
                                    const Consts& k, bool sum_a) {
  const Tensor& zeros = k.zeros;
  auto out = at::native_batch_norm_backward(a, b, std::nullopt, std::nullopt, std::nullopt,
                                            zeros, weight, true, 0.0, {false, true, sum_a});
  return {std::get<1>(out), std::get<2>(out)};
}

// scale[c] * x + shift[c], in x's dtype and memory format. BN's eval kernel (as
// _affine in ops/mabn.py), except for channels_last input of the statistics dtype, where
// a broadcast multiply-add is faster on CPU at every benchmark shape.
Tensor affine(const Tensor& x, const Tensor& scale, const std::optional<Tensor>& shift,
              const Consts& k) {
  if (x.dim() > 2 && x.scalar_type() == scale.scalar_type() &&
      x.suggest_memory_format() != at::MemoryFormat::Contiguous) {
    const Tensor s = channel_view(scale, x.dim());
    return shift ? at::addcmul(channel_view(*shift, x.dim()), x, s) : at::mul(x, s);
  }
  return at::batch_norm(x, scale, shift, k.zeros, k.ones, false, 0.0, 0.0, false);
}

void check_coeffs(const char* op, const Tensor& x, const Tensor& coeffs, const Tensor& step) {
  check_input(op, x, -1);
  TORCH_CHECK(coeffs.scalar_type() == stat_dtype(x), op, ": coeffs must have the statistics ",
              "dtype ", stat_dtype(x), " (the input's, at least float32), got ",
              coeffs.scalar_type());
  check_stat(op, "coeffs", coeffs, stat_dtype(x), {2, x.size(1)});
  read_counter(op, "step", step);
}

// mmdet_bnplug::mabn_train_stats: the spec's "Training forward" statistics. Advances
// num_batches_tracked to t, writes buffer_x2[t % B] and running_var; returns the step's
// coefficients (2, C) (rows as in Row) and a copy of t.
std::tuple<Tensor, Tensor> train_stats(const Tensor& x, const Tensor& running_var,
                                       const Tensor& counter, const Tensor& buffer_x2,
                                       double eps, double momentum, double r_max,
                                       int64_t warmup_iters, int64_t renorm_iters) {
  const char* op = "mabn_train_stats";
  const int64_t C = running_var.size(0);
  check_input(op, x, C);
  const auto dtype = stat_dtype(x);
  const Tensor rv_work = check_stat(op, "running_var", running_var, dtype, {C});
  const Tensor buffer = check_stat(op, "buffer_x2", buffer_x2, dtype, {buffer_x2.size(0), C});
  TORCH_CHECK(buffer.size(0) >= 1, op, ": buffer_x2 must have at least one row");
  const int64_t t = read_counter(op, "num_batches_tracked", counter) + 1;
  TORCH_CHECK(counter.is_contiguous(), op, ": num_batches_tracked must be contiguous");
  const bool batch = use_batch(t, buffer.size(0), warmup_iters);
  const bool renorm = t > std::max(renorm_iters, warmup_iters);
  const Consts k = make_consts(C, dtype);
  const Tensor x2 = std::get<0>(dot_sums(x, x, k.ones, k, false));  // sum(x^2)
  const Tensor coeffs = at::empty({2, C}, rv_work.options());
  const double inv_n = 1.0 / static_cast<double>(x.numel() / C);
  bool finite = false;
  AT_DISPATCH_FLOATING_TYPES(dtype, "mabn_train_stats", [&] {
    using T = scalar_t;
    T* x2p = x2.mutable_data_ptr<T>();
    for (int64_t c = 0; c < C; ++c) x2p[c] *= static_cast<T>(inv_n);
    finite = all_finite(x2p, C);
    T* rv = rv_work.mutable_data_ptr<T>();
    T* q = coeffs.mutable_data_ptr<T>() + kQ * C;
    T* neg_inv_var = coeffs.mutable_data_ptr<T>() + kNegInvVar * C;
    record<T>(buffer, t, batch, finite, x2p, [&](int64_t c, T s2) {
      const T var = s2 + static_cast<T>(eps);
      const T inv_std = T(1) / std::sqrt(var);
      q[c] = inv_std;
      if (renorm) {  // r = clip(sqrt(s2 + eps) / sqrt(running_var + eps)), before update
        const T r = std::sqrt(var / (rv[c] + static_cast<T>(eps)));
        q[c] = std::clamp(r, static_cast<T>(1.0 / r_max), static_cast<T>(r_max)) * inv_std;
      }
      neg_inv_var[c] = -(inv_std * inv_std);
      if (finite) rv[c] += static_cast<T>(momentum) * (s2 - rv[c]);
    });
  });
  Tensor step = counter.clone();
  *step.mutable_data_ptr<int64_t>() = t;
  if (finite) {  // else no state changes: the guard
    *counter.mutable_data_ptr<int64_t>() = t;
    counter.unsafeGetTensorImpl()->bump_version();
    written(running_var, rv_work);
    written(buffer_x2, buffer);
  }
  return {coeffs, step};
}

// mmdet_bnplug::mabn_train_affine: y = (q * w) * x + b.
Tensor train_affine(const Tensor& x, const std::optional<Tensor>& weight,
                    const std::optional<Tensor>& bias, const Tensor& coeffs,
                    const Tensor& step, const Tensor& /*buffer_gz*/,
                    int64_t /*warmup_iters*/) {
  const char* op = "mabn_train_affine";
  check_coeffs(op, x, coeffs, step);
  const Tensor scale = scale_of(coeffs, checked_param(op, "weight", weight, x));
  return affine(x, scale, checked_param(op, "bias", bias, x),
                make_consts(x.size(1), scale.scalar_type()));
}

// mmdet_bnplug::mabn_train_backward: the spec's "Training backward". dw = q * sum(dy * x),
// db = sum(dy), gz = w * dw / n into buffer_gz[t % B], dx = (q * w) * dy - mgz / (s2 + eps) * x.
// Outputs not asked for by ``output_mask`` (dx, -, db) are empty (0,) tensors; dw is always
// computed (gz needs it). dw and db in the statistics dtype.
std::tuple<Tensor, Tensor, Tensor> train_backward(
    const Tensor& dy, const Tensor& x, const std::optional<Tensor>& weight,
    const Tensor& coeffs, const Tensor& step, const Tensor& buffer_gz, int64_t warmup_iters,
    std::array<bool, 3> output_mask) {
  const char* op = "mabn_train_backward";
  check_coeffs(op, x, coeffs, step);
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type() && dy.is_cpu(),
              op, ": dy must be a CPU tensor of x's shape and dtype");
  const int64_t C = x.size(1);
  const auto w = checked_param(op, "weight", weight, x);
  const Tensor buffer = check_stat(op, "buffer_gz", buffer_gz, stat_dtype(x),
                                  {buffer_gz.size(0), C});
  const int64_t t = read_counter(op, "step", step);
  const Consts consts = make_consts(C, coeffs.scalar_type());
  auto [dw, db] = dot_sums(dy, x, coeffs[kQ], consts, output_mask[2]);
  Tensor k = at::empty_like(dw);  // -mgz / (s2 + eps), the coefficient of x in dx
  const double inv_n = 1.0 / static_cast<double>(x.numel() / C);
  bool written_gz = false;  // the guard: a non-finite gz is not recorded
  AT_DISPATCH_FLOATING_TYPES(dw.scalar_type(), "mabn_train_backward", [&] {
    using T = scalar_t;
    const T* dwp = dw.const_data_ptr<T>();
    const T* wp = w ? w->const_data_ptr<T>() : nullptr;
    const T* neg_inv_var = coeffs.const_data_ptr<T>() + kNegInvVar * C;
    std::vector<T> gz(C);
    for (int64_t c = 0; c < C; ++c) gz[c] = dwp[c] * static_cast<T>(inv_n) * (wp ? wp[c] : T(1));
    T* kp = k.mutable_data_ptr<T>();
    written_gz = all_finite(gz.data(), C);
    record<T>(buffer, t, use_batch(t, buffer.size(0), warmup_iters), written_gz, gz.data(),
              [&](int64_t c, T mgz) { kp[c] = mgz * neg_inv_var[c]; });
  });
  if (written_gz) written(buffer_gz, buffer);
  Tensor dx = at::empty({0}, x.options());
  if (output_mask[0]) {
    dx = bnplug::channel_affine2(op, dy, x, scale_of(coeffs, w), k, std::nullopt,
                                 std::nullopt);
  }
  if (!output_mask[2]) db = at::empty({0}, dw.options());
  return {dx, dw, db};
}

using AffineSig = Tensor(const Tensor&, const std::optional<Tensor>&,
                         const std::optional<Tensor>&, const Tensor&, const Tensor&,
                         const Tensor&, int64_t);
using BackwardSig = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const std::optional<Tensor>&, const Tensor&, const Tensor&,
    const Tensor&, int64_t, std::array<bool, 3>);

template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// mabn_train_affine's autograd rule (as _affine_setup_context / _affine_backward in
// ops/mabn.py): saves x, weight, coeffs, step; the backward is mabn_train_backward, which
// writes buffer_gz (kept as a plain reference: it is written, not read as saved).
struct AffineFunction : public torch::autograd::Function<AffineFunction> {
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& x,
                        const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                        const Tensor& coeffs, const Tensor& step, const Tensor& buffer_gz,
                        int64_t warmup_iters) {
    static const auto op = find_op<AffineSig>("mmdet_bnplug::mabn_train_affine");
    Tensor y;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      y = op.call(x, weight, bias, coeffs, step, buffer_gz, warmup_iters);
    }
    ctx->save_for_backward({x, weight ? *weight : Tensor(), coeffs, step});
    ctx->saved_data["buffer_gz"] = buffer_gz;
    ctx->saved_data["warmup_iters"] = warmup_iters;
    ctx->saved_data["has_bias"] = bias.has_value();
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static const auto op = find_op<BackwardSig>("mmdet_bnplug::mabn_train_backward");
    const auto saved = ctx->get_saved_variables();
    std::optional<Tensor> weight;
    if (saved[1].defined()) weight = saved[1];
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1);
    const bool need_b = ctx->needs_input_grad(2) && ctx->saved_data["has_bias"].toBool();
    Tensor dy = grads[0];
    if (!dy.defined()) dy = at::zeros_like(saved[0]);
    auto [dx, dw, db] = op.call(dy, saved[0], weight, saved[2], saved[3],
                                ctx->saved_data["buffer_gz"].toTensor(),
                                ctx->saved_data["warmup_iters"].toInt(), {need_x, need_w, need_b});
    torch::autograd::variable_list out(7);
    if (need_x) out[0] = dx;
    if (weight) {
      if (need_w) out[1] = dw.to(weight->scalar_type());
      if (need_b) out[2] = db.to(weight->scalar_type());
    }
    return out;
  }
};

using StatsSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                           const Tensor&, double, double, double, int64_t,
                                           int64_t);

// mmdet_bnplug::mabn_train, the whole step: mabn_train_stats on x (detached: the
// statistics carry no gradient), then mabn_train_affine; returns (y, coeffs, step).
// CompositeImplicitAutograd: traced, it is those two ops (as _train_composite in
// ops/mabn.py, which serves when this extension is not built).
std::tuple<Tensor, Tensor, Tensor> train(const Tensor& x, const std::optional<Tensor>& weight,
                                         const std::optional<Tensor>& bias,
                                         const Tensor& running_var, const Tensor& counter,
                                         const Tensor& buffer_x2, const Tensor& buffer_gz,
                                         double eps, double momentum, double r_max,
                                         int64_t warmup_iters, int64_t renorm_iters) {
  static const auto stats_op = find_op<StatsSig>("mmdet_bnplug::mabn_train_stats");
  static const auto affine_op = find_op<AffineSig>("mmdet_bnplug::mabn_train_affine");
  auto [coeffs, step] = stats_op.call(x.detach(), running_var, counter, buffer_x2, eps,
                                      momentum, r_max, warmup_iters, renorm_iters);
  Tensor y = affine_op.call(x, weight, bias, coeffs, step, buffer_gz, warmup_iters);
  return {y, coeffs, step};
}

Tensor train_affine_autograd(const Tensor& x, const std::optional<Tensor>& weight,
                             const std::optional<Tensor>& bias, const Tensor& coeffs,
                             const Tensor& step, const Tensor& buffer_gz,
                             int64_t warmup_iters) {
  return AffineFunction::apply(x, weight, bias, coeffs, step, buffer_gz, warmup_iters);
}

}  // namespace

TORCH_LIBRARY_IMPL(mmdet_bnplug, CompositeImplicitAutograd, m) {
  m.impl("mabn_train", TORCH_FN(train));
}

TORCH_LIBRARY_IMPL(mmdet_bnplug, CPU, m) {
  m.impl("mabn_train_stats", TORCH_FN(train_stats));
  m.impl("mabn_train_affine", TORCH_FN(train_affine));
  m.impl("mabn_train_backward", TORCH_FN(train_backward));
}

TORCH_LIBRARY_IMPL(mmdet_bnplug, AutogradCPU, m) {
  m.impl("mabn_train_affine", TORCH_FN(train_affine_autograd));
}

// Importing the module registers the kernels above (ops/mabn.py imports it).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CPU kernels of MABN's training-step ops (mmdet_bnplug/ops/csrc/mabn_cpu.cpp)";
  // what importing registered: ops/mabn.py tells this build from an older one
  m.attr("REGISTERED") = pybind11::make_tuple("mabn_train", "mabn_train_stats",
                                              "mabn_train_affine", "mabn_train_backward");
}
