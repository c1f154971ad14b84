// Helpers shared by the CPU kernels of the norm layers (mabn_cpu.cpp, sync_bn_cpu.cpp):
// the statistics dtype, argument checks of per-channel tensors, in-place write-back, and
// the one-pass per-channel combination of one or two feature maps that both layers' input
// gradients (and PortableSyncBN's output) are.
#pragma once

#include <torch/extension.h>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <optional>
#include <type_traits>
#include <vector>

namespace bnplug {

using at::Tensor;

// fp32 for half/bf16 (and fp32) input, fp64 for fp64 input.
inline at::ScalarType stat_dtype(const Tensor& x) {
  return at::promote_types(x.scalar_type(), at::kFloat);
}

// x of shape (N, C, *); C < 0: any C.
inline void check_input(const char* op, const Tensor& x, int64_t C) {
  TORCH_CHECK(x.is_cpu(), op, ": x must be a CPU tensor, got one on ", x.device());
  TORCH_CHECK(x.dim() >= 2, op, ": x must have shape (N, C, *), got ", x.sizes());
  TORCH_CHECK(C < 0 || x.size(1) == C, op, ": x must have shape (N, ", C, ", *), got ",
              x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op,
              ": x must be floating point, got ", x.scalar_type());
}

// A per-channel tensor: CPU, floating point, contiguous, the given shape. Returns it in
// the statistics dtype ``dtype`` (a copy when it has another, e.g. fp16 buffers of a half
// module: the kernels read and write the statistics through raw pointers of that dtype).
inline Tensor check_stat(const char* op, const char* name, const Tensor& t,
                         at::ScalarType dtype, at::IntArrayRef shape) {
  TORCH_CHECK(t.is_cpu(), op, ": ", name, " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
              " must be floating point, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

// weight or bias (C,) of input x, in the statistics dtype.
inline std::optional<Tensor> checked_param(const char* op, const char* name,
                                           const std::optional<Tensor>& p, const Tensor& x) {
  if (!p) return std::nullopt;
  return check_stat(op, name, *p, stat_dtype(x), {x.size(1)});
}

// Writes back a statistic computed in ``work`` (check_stat's result) into ``t`` and bumps
// ``t``'s version counter: it was modified in place.
inline void written(const Tensor& t, const Tensor& work) {
  if (!work.is_same(t)) t.copy_(work);
  t.unsafeGetTensorImpl()->bump_version();
}

// A (C,) tensor viewed as (1, C, 1, ...) to broadcast over a rank-``dim`` input.
inline Tensor channel_view(const Tensor& v, int64_t dim) {
  std::vector<int64_t> shape(dim, 1);
  shape[1] = -1;
  return v.view(shape);
}

// out = a[c] * u + k[c] * (v - m[c]) + s[c] per channel c (u absent: no a-term; m, s
// absent: 0), in one pass over memory, computed in the statistics dtype and rounded once
// to ``v``'s dtype; v - m is taken first, so a large mean against a small spread keeps its
// precision. u, v: (N, C, *) of one floating dtype; out has v's dtype and memory format (u
// is made to match v's layout when it differs). a (with u), k, m, s: (C,) contiguous,
// statistics dtype.
inline Tensor channel_affine2(const char* op, const std::optional<Tensor>& u, const Tensor& v,
                              const std::optional<Tensor>& a, const Tensor& k,
                              const std::optional<Tensor>& m, const std::optional<Tensor>& s) {
  TORCH_CHECK(!u || (u->sizes() == v.sizes() && u->scalar_type() == v.scalar_type() &&
                     u->is_cpu()),
              op, ": dy must be a CPU tensor of x's shape and dtype");
  TORCH_CHECK(u.has_value() == a.has_value(), op, ": internal: u and a go together");
  const int64_t C = v.size(1);
  const auto sd = stat_dtype(v);
  const auto fmt = v.dim() > 2 ? v.suggest_memory_format() : at::MemoryFormat::Contiguous;
  const Tensor vv = v.contiguous(fmt);
  const Tensor uu = u ? u->contiguous(fmt) : Tensor();
  Tensor out = at::empty(v.sizes(), v.options().memory_format(fmt));
  const int64_t N = v.size(0);
  if (out.numel() == 0) return out;
  const int64_t inner = v.numel() / (N * C);
  const bool channels_last = fmt != at::MemoryFormat::Contiguous;
  const auto per_channel = [&](const std::optional<Tensor>& t, const char* name) {
    return t ? std::optional<Tensor>(check_stat(op, name, *t, sd, {C})) : std::nullopt;
  };
  const Tensor ck = check_stat(op, "k", k, sd, {C});
  const std::optional<Tensor> ca = per_channel(a, "a"), cm = per_channel(m, "mean"),
                              cs = per_channel(s, "shift");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(),
                                  "channel_affine2", [&] {
    using T = scalar_t;
    using S = at::opmath_type<T>;  // float for half/bf16/float, double for double
    TORCH_CHECK(c10::CppTypeToScalarType<S>::value == sd, op, ": internal dtype mismatch");
    const T* __restrict__ up = u ? uu.const_data_ptr<T>() : nullptr;
    const T* __restrict__ vp = vv.const_data_ptr<T>();
    T* __restrict__ outp = out.mutable_data_ptr<T>();
    const S* kp = ck.const_data_ptr<S>();
    std::vector<S> scale(C, S(0)), shift(C, S(0)), mean(C, S(0));
    for (int64_t c = 0; c < C; ++c) {
      if (ca) scale[c] = ca->const_data_ptr<S>()[c];
      if (cs) shift[c] = cs->const_data_ptr<S>()[c];
      if (cm) mean[c] = cm->const_data_ptr<S>()[c];
    }
    const S* ap = scale.data();
    const S* sp = shift.data();
    const S* mp = mean.data();
    const auto run = [&](auto with_u) {  // the loops, with or without the u-term
      constexpr bool kWithU = decltype(with_u)::value;
      if (!channels_last) {  // planes of `inner` values, one channel each
        const int64_t grain =
            std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(inner, 1));
        at::parallel_for(0, N * C, grain, [&](int64_t begin, int64_t end) {
          for (int64_t p = begin; p < end; ++p) {
            const int64_t c = p % C;
            const S ac = ap[c], kc = kp[c], mc = mp[c], sc = sp[c];
            const T* __restrict__ vi = vp + p * inner;
            T* __restrict__ oi = outp + p * inner;
            if constexpr (kWithU) {
              const T* __restrict__ ui = up + p * inner;
              for (int64_t i = 0; i < inner; ++i)
                oi[i] = static_cast<T>(ac * static_cast<S>(ui[i]) +
                                       kc * (static_cast<S>(vi[i]) - mc) + sc);
            } else {
              for (int64_t i = 0; i < inner; ++i)
                oi[i] = static_cast<T>(kc * (static_cast<S>(vi[i]) - mc) + sc);
            }
          }
        });
      } else {  // rows of C values, one per position
        const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / C);
        at::parallel_for(0, N * inner, grain, [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) {
            const T* __restrict__ vi = vp + r * C;
            T* __restrict__ oi = outp + r * C;
            if constexpr (kWithU) {
              const T* __restrict__ ui = up + r * C;
              for (int64_t c = 0; c < C; ++c)
                oi[c] = static_cast<T>(ap[c] * static_cast<S>(ui[c]) +
                                       kp[c] * (static_cast<S>(vi[c]) - mp[c]) + sp[c]);
            } else {
              for (int64_t c = 0; c < C; ++c)
                oi[c] = static_cast<T>(kp[c] * (static_cast<S>(vi[c]) - mp[c]) + sp[c]);
            }
          }
        });
      }
    };
    if (u) {
      run(std::true_type{});
    } else {
      run(std::false_type{});
    }
  });
  return out;
}

}  // namespace bnplug
