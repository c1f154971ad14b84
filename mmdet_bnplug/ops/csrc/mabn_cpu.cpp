// MABN's whole training step on CPU in one call from Python: counter and phase,
// statistics, ring buffers, running_var, output, and a C++ autograd node for the
// backward. The arithmetic and the passes over memory are those of _MABNFunction in
// mabn.py (the path for every other device): ATen's vectorised kernels for the
// elementwise work (see affine), plain loops for the per-channel statistics. What this saves is the
// Python dispatch of ~20 small per-channel tensor ops per step, which dominates on
// small feature maps (FPN P6/P7).
#include <torch/extension.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// One step's per-channel coefficients, (3, C) in the statistics dtype.
enum Row { kQ = 0, kNegInvVar = 1, kScale = 2 };  // r / sqrt(s2 + eps), -1 / (s2 + eps), q * w

// A layer's host-side state on this path (MABN._host['compiled']), updated in place.
struct State {
  // the last step, reused without any state change when activation checkpointing
  // re-runs the forward inside the backward
  Tensor coeffs;  // (3, C), rows as in Row; undefined before the first step
  int64_t slot = 0;  // ring-buffer row t % buffer_size
  bool use_batch = true;  // batch statistics instead of the moving averages
  Tensor zeros, ones;  // (C,) constants for BN's kernels, in the statistics dtype
};

struct Hyper {
  double eps, momentum, r_max;
  int64_t warmup_iters, renorm_iters;
};

// Advances the counter t (an int64 CPU scalar: reading it is no device sync) and sets
// the new step's phase in ``state``; returns whether the renorm factor is active.
bool begin_step(const Tensor& counter, const Tensor& buffer, const Hyper& h, State* state) {
  const int64_t t = ++*counter.mutable_data_ptr<int64_t>();
  torch::autograd::impl::bump_version(counter);
  const int64_t buffer_size = buffer.size(0);
  state->coeffs = at::empty({3, buffer.size(1)}, buffer.options());
  state->slot = t % buffer_size;
  state->use_batch = t <= buffer_size || t < h.warmup_iters;
  if (!state->zeros.defined() || state->zeros.scalar_type() != buffer.scalar_type() ||
      state->zeros.size(0) != buffer.size(1)) {
    state->zeros = at::zeros({buffer.size(1)}, buffer.options());
    state->ones = at::ones_like(state->zeros);
  }
  return t > std::max(h.renorm_iters, h.warmup_iters);
}

// One step's per-channel view, pointers in the statistics dtype T; ring-buffer row b
// is ``buffer + b * C``.
template <typename T>
struct Channels {
  int64_t C, rows, slot;
  bool use_batch;
  T* buffer;  // buffer_x2 in the forward, buffer_gz in the backward
  T* coeffs;  // row r of channel c at coeffs[r * C + c]
  const T* weight;  // nullptr without affine

  Channels(const Tensor& buf, const Tensor& coeffs_, int64_t slot_, bool use_batch_,
           const std::optional<Tensor>& w)
      : C(buf.size(1)), rows(buf.size(0)), slot(slot_), use_batch(use_batch_),
        buffer(buf.mutable_data_ptr<T>()), coeffs(coeffs_.mutable_data_ptr<T>()),
        weight(w ? w->const_data_ptr<T>() : nullptr) {}

  T& coeff(Row row, int64_t c) const { return coeffs[row * C + c]; }

  // buffer[slot][c] = value; returns the statistic to use: value or the rows' mean
  T record(int64_t c, T value) const {
    buffer[slot * C + c] = value;
    if (use_batch) return value;
    T acc = 0;
    for (int64_t b = 0; b < rows; ++b) acc += buffer[b * C + c];
    return acc / static_cast<T>(rows);
  }
};

// Runs ``per_channel(channels, c, values[c])`` for every channel of a (C,) statistic.
template <typename F>
void each_channel(const Tensor& buffer, const Tensor& coeffs, int64_t slot, bool use_batch,
                  const std::optional<Tensor>& w, const Tensor& values, F per_channel) {
  AT_DISPATCH_FLOATING_TYPES(buffer.scalar_type(), "mabn_channels", [&] {
    const Channels<scalar_t> ch(buffer, coeffs, slot, use_batch, w);
    const scalar_t* v = values.const_data_ptr<scalar_t>();
    for (int64_t c = 0; c < ch.C; ++c) per_channel(ch, c, v[c]);
  });
}

// (weight * sum(a * b), sum(a) if wanted) per channel in one pass, any layout and
// dtype: BN's backward reduction with mean 0 and invstd ``weight`` (_dot_sums in mabn.py).
std::tuple<Tensor, Tensor> dot_sums(const Tensor& a, const Tensor& b, const Tensor& weight,
                                    const Tensor& zeros, bool sum_a) {
  auto out = at::native_batch_norm_backward(a, b, std::nullopt, std::nullopt, std::nullopt,
                                            zeros, weight, true, 0.0, {false, true, sum_a});
  return {std::get<1>(out), std::get<2>(out)};
}

// A (C,) tensor viewed as (1, C, 1, ...) to broadcast over a rank-``dim`` input.
Tensor channel_view(const Tensor& v, int64_t dim) {
  std::vector<int64_t> shape(dim, 1);
  shape[1] = -1;
  return v.view(shape);
}

// scale[c] * x + shift[c], in x's dtype and memory format. BN's eval kernel (as
// _affine in mabn.py), except for channels_last input of the statistics dtype, where a
// broadcast multiply-add is faster on CPU at every benchmark shape.
Tensor affine(const Tensor& x, const Tensor& scale, const std::optional<Tensor>& shift,
              const Tensor& zeros, const Tensor& ones) {
  if (x.dim() > 2 && x.scalar_type() == scale.scalar_type() &&
      x.suggest_memory_format() != at::MemoryFormat::Contiguous) {
    const Tensor s = channel_view(scale, x.dim());
    return shift ? at::addcmul(channel_view(*shift, x.dim()), x, s) : at::mul(x, s);
  }
  return at::batch_norm(x, scale, shift, zeros, ones, false, 0.0, 0.0, false);
}

struct MABNTrain : public torch::autograd::Function<MABNTrain> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x,
                               const std::optional<Tensor>& weight,
                               const std::optional<Tensor>& bias, const Tensor& running_var,
                               const Tensor& counter, const Tensor& buffer_x2,
                               const Tensor& buffer_gz, State* state, const Hyper& h) {
    if (!state->coeffs.defined() || torch::autograd::get_current_graph_task_id() == -1) {
      const bool renorm = begin_step(counter, buffer_x2, h, state);
      // the spec's "Training forward" statistics of each channel from its E[x^2]
      const Tensor x2_sum = std::get<0>(dot_sums(x, x, state->ones, state->zeros, false));
      const double inv_n = 1.0 / static_cast<double>(x.numel() / x.size(1));
      each_channel(buffer_x2, state->coeffs, state->slot, state->use_batch, weight, x2_sum,
                   [&](const auto& ch, int64_t c, auto sum) {
        using T = decltype(sum);
        T* rv = running_var.mutable_data_ptr<T>();
        const T s2 = ch.record(c, sum * static_cast<T>(inv_n));
        const T var = s2 + static_cast<T>(h.eps);
        const T inv_std = T(1) / std::sqrt(var);
        T q = inv_std;
        if (renorm) {  // r = clip(sqrt(s2 + eps) / sqrt(running_var + eps)), before update
          const T r = std::sqrt(var / (rv[c] + static_cast<T>(h.eps)));
          q = std::clamp(r, static_cast<T>(1.0 / h.r_max), static_cast<T>(h.r_max)) * inv_std;
        }
        rv[c] += static_cast<T>(h.momentum) * (s2 - rv[c]);
        ch.coeff(kQ, c) = q;
        ch.coeff(kNegInvVar, c) = -(inv_std * inv_std);
        ch.coeff(kScale, c) = ch.weight ? q * ch.weight[c] : q;
      });
      torch::autograd::impl::bump_version(running_var);
      torch::autograd::impl::bump_version(buffer_x2);
    }
    ctx->save_for_backward({x, weight ? *weight : Tensor()});
    auto& saved = ctx->saved_data;
    saved["coeffs"] = state->coeffs;
    saved["slot"] = state->slot;
    saved["use_batch"] = state->use_batch;
    saved["buffer_gz"] = buffer_gz;
    saved["zeros"] = state->zeros;
    saved["ones"] = state->ones;
    ctx->set_materialize_grads(false);
    // y = (q * w) * x + b
    return {affine(x, state->coeffs[kScale], bias, state->zeros, state->ones)};
  }

  // The spec's "Training backward": dw = q * sum(dy * x), db = sum(dy),
  // gz = w * dw / n into buffer_gz[slot], dx = (q * w) * dy - mgz / (s2 + eps) * x.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(9);  // one per argument of forward
    const Tensor& dy = grads[0];
    if (!dy.defined()) return out;
    const variable_list saved_vars = ctx->get_saved_variables();
    const Tensor& x = saved_vars[0];
    std::optional<Tensor> weight;
    if (saved_vars[1].defined()) weight = saved_vars[1];
    auto& saved = ctx->saved_data;
    const Tensor coeffs = saved["coeffs"].toTensor(), buffer_gz = saved["buffer_gz"].toTensor();
    const Tensor zeros = saved["zeros"].toTensor(), ones = saved["ones"].toTensor();
    auto [dw, db] = dot_sums(dy, x, coeffs[kQ], zeros, ctx->needs_input_grad(2));
    Tensor k = at::empty_like(dw);  // -mgz / (s2 + eps), the coefficient of x in dx
    const double inv_n = 1.0 / static_cast<double>(x.numel() / x.size(1));
    each_channel(buffer_gz, coeffs, saved["slot"].toInt(), saved["use_batch"].toBool(), weight,
                 dw, [&](const auto& ch, int64_t c, auto dwc) {
      using T = decltype(dwc);
      const T gz = dwc * static_cast<T>(inv_n) * (ch.weight ? ch.weight[c] : T(1));
      k.mutable_data_ptr<T>()[c] = ch.record(c, gz) * ch.coeff(kNegInvVar, c);
    });
    torch::autograd::impl::bump_version(buffer_gz);
    if (ctx->needs_input_grad(0)) {
      Tensor scale = coeffs[kScale];
      if (scale.scalar_type() != x.scalar_type()) scale = scale.to(x.scalar_type());
      out[0] = affine(x, k, std::nullopt, zeros, ones)
                   .addcmul_(dy, channel_view(scale, x.dim()));
    }
    if (weight) {
      out[1] = dw;
      out[2] = db;
    }
    return out;
  }
};

// The training step's output y; advances ``state`` and the buffers. The caller
// (MABN.forward) sends CPU tensors only, with running_var in the statistics dtype
// (float32 or float64: the input's, promoted to at least fp32); the other buffers' and
// the parameters' dtypes are checked here.
Tensor train_step(const Tensor& x, const std::optional<Tensor>& weight,
                  const std::optional<Tensor>& bias, const Tensor& running_var,
                  const Tensor& counter, const Tensor& buffer_x2, const Tensor& buffer_gz,
                  State& state, double eps, double momentum, double r_max,
                  int64_t warmup_iters, int64_t renorm_iters) {
  for (const Tensor* t : {&running_var, &counter, &buffer_x2, &buffer_gz})
    TORCH_CHECK(t->is_cpu(), "MABN: buffers on ", t->device(), " with a CPU input");
  const auto stat = running_var.scalar_type();
  for (const auto* t : {&weight, &bias})
    TORCH_CHECK(!*t || ((*t)->scalar_type() == stat && (*t)->is_cpu()),
                "MABN: weight and bias must be CPU tensors of running_var's dtype ", stat);
  TORCH_CHECK(buffer_x2.scalar_type() == stat && buffer_gz.scalar_type() == stat,
              "MABN: buffer_x2 and buffer_gz must have running_var's dtype ", stat);
  TORCH_CHECK(counter.scalar_type() == at::kLong && counter.numel() == 1,
              "MABN: num_batches_tracked must be an int64 scalar");
  const Hyper h{eps, momentum, r_max, warmup_iters, renorm_iters};
  return MABNTrain::apply(x, weight, bias, running_var, counter, buffer_x2, buffer_gz,
                          &state, h)[0];
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "MABN's CPU training step (mmdet_bnplug/ops/csrc/mabn_cpu.cpp)";
  // copies and pickles (deepcopy for EMA models, torch.save of a module) start afresh:
  // the state is a cache; everything that defines the layer is in its buffers
  pybind11::class_<State>(m, "State", "A layer's host-side state on the compiled path")
      .def(pybind11::init<>())
      .def(pybind11::pickle([](const State&) { return pybind11::tuple(); },
                            [](const pybind11::tuple&) { return State(); }));
  m.def("train_step", &train_step);
}
