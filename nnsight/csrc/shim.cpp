// Small additions to what tch exposes of libtorch, compiled by nnsight/build.rs with the `cc` crate against the
// headers of the libtorch in use. Every function is `extern "C"`, catches every C++ exception, and hands tensors
// back as `new at::Tensor(...)`, owned from then on by exactly one Rust `tch::Tensor`.

#include <ATen/ExpandUtils.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/ops/result_type.h>
#include <torch/library.h>
#include <torch/csrc/autograd/autograd.h>

#include <c10/util/intrusive_ptr.h>

#ifdef NNSIGHT_KEEP_TORCH_CUDA
#include <ATen/ops/relu_cuda_dispatch.h>
#endif

#include <memory>
#include <mutex>
#include <tuple>

// ---- meta kernels that libtorch's C++ lacks ------------------------------------------------------------------
// PyTorch registers some ops' meta kernels in Python (torch/_meta_registrations.py); a C++ program without Python
// has none for them, so a forward pass on meta tensors stops at the first such op. These give the result's shape and
// dtype alone. Each is registered only where this libtorch has no Meta kernel of its own.

namespace {

at::TensorOptions meta_options(at::ScalarType dtype) {
    return at::TensorOptions().dtype(dtype).device(at::kMeta);
}

std::vector<int64_t> broadcast(at::IntArrayRef a, at::IntArrayRef b) {
    return at::infer_size(a, b);
}

at::Tensor where_self(const at::Tensor &condition, const at::Tensor &self, const at::Tensor &other) {
    auto shape = broadcast(broadcast(condition.sizes(), self.sizes()), other.sizes());
    return at::empty(shape, meta_options(at::result_type(self, other)));
}

at::Tensor &where_self_out(const at::Tensor &condition, const at::Tensor &self, const at::Tensor &other,
                           at::Tensor &out) {
    out.resize_(broadcast(broadcast(condition.sizes(), self.sizes()), other.sizes()));
    return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> native_layer_norm(const at::Tensor &input,
                                                                 c10::SymIntArrayRef normalized_shape,
                                                                 const std::optional<at::Tensor> &weight,
                                                                 const std::optional<at::Tensor> &bias, double eps) {
    auto stats = input.sizes().vec();
    for (size_t i = 0; i < normalized_shape.size() && i < stats.size(); ++i) {
        stats[stats.size() - 1 - i] = 1;
    }
    auto options = meta_options(input.scalar_type());
    return {at::empty(input.sizes(), options), at::empty(stats, options), at::empty(stats, options)};
}

at::Tensor index_select(const at::Tensor &self, int64_t dim, const at::Tensor &index) {
    auto shape = self.sizes().vec();
    if (shape.empty()) {
        return at::empty({}, meta_options(self.scalar_type()));
    }
    int64_t d = dim < 0 ? dim + static_cast<int64_t>(shape.size()) : dim;
    TORCH_CHECK(d >= 0 && d < static_cast<int64_t>(shape.size()), "index_select(): dim ", dim, " out of range");
    TORCH_CHECK(index.dim() <= 1, "index_select(): index must be a vector, found ", index.dim(), " dimensions");
    shape[d] = index.numel();
    return at::empty(shape, meta_options(self.scalar_type()));
}

at::Tensor reduce_all(const at::Tensor &self) {
    TORCH_CHECK(self.numel() > 0, "max()/min() of an empty tensor");
    return at::empty({}, meta_options(self.scalar_type()));
}

at::Tensor &binary_bool_out(const at::Tensor &self, const at::Tensor &other, at::Tensor &out) {
    out.resize_(broadcast(self.sizes(), other.sizes()));
    return out;
}

at::Tensor &unary_out(const at::Tensor &self, at::Tensor &out) {
    out.resize_(self.sizes());
    return out;
}

// Fused attention on shapes: libtorch would decompose it into a dozen meta ops (its math path); the result is
// query's shape with value's last dimension. Checks what the fused kernels check of the shapes.
at::Tensor scaled_dot_product_attention(const at::Tensor &query, const at::Tensor &key, const at::Tensor &value,
                                        const std::optional<at::Tensor> &attn_mask, double dropout_p, bool is_causal,
                                        std::optional<double> scale, bool enable_gqa) {
    TORCH_CHECK(query.dim() >= 2 && key.dim() >= 2 && value.dim() >= 2,
                "scaled_dot_product_attention: query, key and value need at least 2 dimensions");
    TORCH_CHECK(query.size(-1) == key.size(-1), "scaled_dot_product_attention: query's last dimension (",
                query.size(-1), ") differs from key's (", key.size(-1), ")");
    TORCH_CHECK(key.size(-2) == value.size(-2), "scaled_dot_product_attention: key has ", key.size(-2),
                " positions but value has ", value.size(-2));
    if (query.dim() >= 3 && key.dim() >= 3) {
        int64_t hq = query.size(-3), hk = key.size(-3);
        TORCH_CHECK(hq == hk || (enable_gqa && hk > 0 && hq % hk == 0), "scaled_dot_product_attention: ", hq,
                    " query heads and ", hk, " key heads", enable_gqa ? "" : " (without grouped-query attention)");
    }
    auto shape = query.sizes().vec();
    if (attn_mask.has_value() && attn_mask->defined()) {
        auto scores = shape;
        scores.back() = key.size(-2);
        TORCH_CHECK(at::infer_size(attn_mask->sizes(), scores) == scores,
                    "scaled_dot_product_attention: the mask does not broadcast to the scores ", scores);
    }
    shape.back() = value.size(-1);
    return at::empty(shape, meta_options(query.scalar_type()));
}

// ---- gradient hooks ------------------------------------------------------------------------------------------
// A Rust closure behind `void *ctx`, called from a lambda that libtorch keeps in the tensor's hook list (and, for a
// non-leaf tensor, in its grad_fn's pre-hooks). Ownership, in full:
//   - ctx: owned by one RustContext from the moment nnsight_register_grad_hook is called (even when it fails);
//     every copy of the lambda (std::function copies it) shares that RustContext through a shared_ptr, whose last
//     release calls `drop(ctx)` exactly once: when the hook is removed, when the tensor and its graph are freed, or
//     at once when registration fails. Rust never frees ctx itself.
//   - the gradient handed to `call`: borrowed for the call, never freed by Rust.
//   - a replacement gradient: Rust writes into *out the `new at::Tensor` behind a tch::Tensor whose ownership it
//     gives up (it never drops that tch::Tensor); the lambda moves from it and deletes it, exactly once.
//   - the handle (nnsight_grad_hook): allocated here, freed by nnsight_free_grad_hook, once. It holds only a weak
//     reference to the tensor, so a handle never keeps a tensor (or its graph) alive.

// Returns 0 for "no change" (*out untouched), 1 when *out holds a replacement gradient.
typedef int (*nnsight_grad_hook_call)(void *ctx, const at::Tensor *grad, at::Tensor **out);
// Frees ctx; called once. Must not throw or unwind.
typedef void (*nnsight_grad_hook_drop)(void *ctx);

struct RustContext {
    void *ctx;
    nnsight_grad_hook_drop drop;
    RustContext(void *ctx, nnsight_grad_hook_drop drop) : ctx(ctx), drop(drop) {}
    RustContext(const RustContext &) = delete;
    RustContext &operator=(const RustContext &) = delete;
    ~RustContext() { drop(ctx); }
};

}  // namespace

struct nnsight_grad_hook {
    c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> tensor;
    unsigned index;
};

namespace {

bool has_meta_kernel(const char *name, const char *overload) {
    auto op = c10::Dispatcher::singleton().findSchema({name, overload});
    return !op.has_value() || op->hasKernelForDispatchKey(c10::DispatchKey::Meta);
}

}  // namespace

extern "C" {

// oneDNN's linear on dense float tensors (`mkldnn::_linear_pointwise`, the kernel PyTorch's compiler uses on CPU):
// y = x W^T + b. On small batches it runs about 1.5-3x faster than the MKL sgemm behind at::linear. It has no
// autograd formula, so callers use it only when no gradient is wanted. Writes the result to *out and returns 0;
// returns 1 when this libtorch has no such operator, 2 when the call failed (the caller then uses at::linear).
int nnsight_onednn_linear(const at::Tensor *x, const at::Tensor *w, const at::Tensor *b, at::Tensor **out) {
    const c10::OperatorHandle *op = nullptr;
    try {
        static const std::optional<c10::OperatorHandle> found =
            c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
        if (!found.has_value()) {
            return 1;
        }
        op = &found.value();
    } catch (...) {
        return 1;
    }
    try {
        torch::jit::Stack stack;
        stack.reserve(6);
        stack.emplace_back(*x);
        stack.emplace_back(*w);
        if (b != nullptr) {
            stack.emplace_back(*b);
        } else {
            stack.emplace_back();
        }
        stack.emplace_back(std::string("none"));
        stack.emplace_back(c10::List<std::optional<at::Scalar>>());
        stack.emplace_back();
        op->callBoxed(&stack);
        *out = new at::Tensor(stack[0].toTensor());
        return 0;
    } catch (...) {
        return 2;
    }
}

// Registers the meta kernels above for the ops that have none (once per process). Returns 0, or 1 when libtorch
// refused a registration (scans then stop at that op with libtorch's own message).
int nnsight_install_meta_kernels() {
    static std::once_flag once;
    static int status = 0;
    std::call_once(once, [] {
        try {
            static auto *lib =
                new torch::Library(torch::Library::IMPL, "aten", c10::DispatchKey::Meta, __FILE__, __LINE__);
            auto add = [](const char *name, const char *overload, auto &&register_it) {
                if (!has_meta_kernel(name, overload)) {
                    register_it();
                }
            };
            add("aten::where", "self", [] { lib->impl("where.self", TORCH_FN(where_self)); });
            add("aten::where", "self_out", [] { lib->impl("where.self_out", TORCH_FN(where_self_out)); });
            add("aten::native_layer_norm", "", [] { lib->impl("native_layer_norm", TORCH_FN(native_layer_norm)); });
            add("aten::index_select", "", [] { lib->impl("index_select", TORCH_FN(index_select)); });
            add("aten::max", "", [] { lib->impl("max", TORCH_FN(reduce_all)); });
            add("aten::min", "", [] { lib->impl("min", TORCH_FN(reduce_all)); });
            add("aten::logical_and", "out", [] { lib->impl("logical_and.out", TORCH_FN(binary_bool_out)); });
            add("aten::logical_or", "out", [] { lib->impl("logical_or.out", TORCH_FN(binary_bool_out)); });
            add("aten::logical_xor", "out", [] { lib->impl("logical_xor.out", TORCH_FN(binary_bool_out)); });
            add("aten::logical_not", "out", [] { lib->impl("logical_not.out", TORCH_FN(unary_out)); });
            add("aten::abs", "out", [] { lib->impl("abs.out", TORCH_FN(unary_out)); });
            add("aten::scaled_dot_product_attention", "",
                [] { lib->impl("scaled_dot_product_attention", TORCH_FN(scaled_dot_product_attention)); });
        } catch (...) {
            status = 1;
        }
    });
    return status;
}

// A tensor of the same sizes, strides and dtype as *t on the meta device: shapes only, no storage, no data copied.
// Writes it to *out and returns 0; returns 1 when libtorch threw.
int nnsight_to_meta(const at::Tensor *t, at::Tensor **out) {
    try {
        if (t->is_meta()) {
            *out = new at::Tensor(*t);
        } else {
            *out = new at::Tensor(at::empty_strided(t->sizes(), t->strides(), t->options().device(at::kMeta)));
        }
        return 0;
    } catch (...) {
        return 1;
    }
}

// A contiguous meta tensor of the given sizes and dtype (`scalar_type`, c10::ScalarType's value).
int nnsight_empty_meta(const int64_t *sizes, size_t ndim, int scalar_type, at::Tensor **out) {
    try {
        auto options = at::TensorOptions().dtype(static_cast<c10::ScalarType>(scalar_type)).device(at::kMeta);
        *out = new at::Tensor(at::empty(c10::IntArrayRef(sizes, ndim), options));
        return 0;
    } catch (...) {
        return 1;
    }
}

// 1 when *a and *b are handles on one tensor (the same TensorImpl, as after a shallow clone), else 0.
int nnsight_same_tensor(const at::Tensor *a, const at::Tensor *b) {
    return a->is_same(*b) ? 1 : 0;
}

// 1 when *t is defined and on the meta device, else 0 (tch reports a meta tensor's device as MPS).
int nnsight_is_meta(const at::Tensor *t) {
    try {
        return t->defined() && t->is_meta() ? 1 : 0;
    } catch (...) {
        return 0;
    }
}

// Registers a gradient hook on *t that calls `call(ctx, &grad, &out)` each time a gradient with respect to *t is
// computed (an undefined gradient is passed through without a call). The hooks of one tensor run in registration
// order, each seeing the previous one's result. On success writes a fresh handle to *handle and returns 0; returns
// 1 when *t does not require grad, 2 when libtorch refused (the context is then already dropped, as on success when
// the hook goes away). Never throws.
int nnsight_register_grad_hook(const at::Tensor *t, void *ctx, nnsight_grad_hook_call call,
                               nnsight_grad_hook_drop drop, nnsight_grad_hook **handle) {
    std::shared_ptr<RustContext> owner;
    try {
        owner = std::make_shared<RustContext>(ctx, drop);
    } catch (...) {
        drop(ctx);
        return 2;
    }
    try {
        if (!t->defined() || !t->requires_grad()) {
            return 1;  // `owner` drops ctx on the way out
        }
        auto weak = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(t->getIntrusivePtr());
        auto *h = new nnsight_grad_hook{std::move(weak), 0};
        try {
            h->index = t->register_hook([owner = std::move(owner), call](const at::Tensor &grad) -> at::Tensor {
                if (!grad.defined()) {
                    return at::Tensor();
                }
                at::Tensor *out = nullptr;
                // `call` never unwinds (the Rust side catches every panic).
                if (call(owner->ctx, &grad, &out) != 1 || out == nullptr) {
                    return at::Tensor();  // no change
                }
                at::Tensor replaced = std::move(*out);
                delete out;
                return replaced;
            });
        } catch (...) {
            delete h;
            throw;
        }
        *handle = h;
        return 0;
    } catch (...) {
        return 2;
    }
}

// Removes the hook, if its tensor is still alive (when it is not, libtorch has freed or will free the hook with
// the graph); the lambda, and with it ctx, is dropped now. Does not free the handle. Removing twice is harmless.
// libtorch keeps the emptied slot (an empty std::function) in the tensor's hook list until the tensor dies.
// Returns 1 when the tensor was alive and the hook removed, 0 otherwise. Never throws.
int nnsight_remove_grad_hook(nnsight_grad_hook *handle) {
    try {
        auto impl = handle->tensor.lock();
        if (!impl.defined()) {
            return 0;
        }
        at::Tensor t(std::move(impl));
        t.remove_hook(handle->index);
        return 1;
    } catch (...) {
        return 0;
    }
}

// Frees a handle (not the hook: that stays with its tensor until removed or freed with it).
void nnsight_free_grad_hook(nnsight_grad_hook *handle) {
    delete handle;
}

// Backpropagates from the one-element *loss, accumulating into the `.grad` of every leaf that requires grad and
// that the loss depends on, as `loss.backward()` does in PyTorch; the graph is kept when keep_graph is nonzero.
// Returns 0, or 1 when libtorch refused (its message, cut to err_len - 1 bytes, is written to err). Never throws.
int nnsight_backward(const at::Tensor *loss, int keep_graph, char *err, size_t err_len) {
    try {
        torch::autograd::backward({*loss}, {}, keep_graph != 0, false);
        return 0;
    } catch (const std::exception &e) {
        if (err_len > 0) {
            std::snprintf(err, err_len, "%s", e.what());
        }
        return 1;
    } catch (...) {
        if (err_len > 0) {
            std::snprintf(err, err_len, "%s", "unknown libtorch error");
        }
        return 1;
    }
}

// Drops *t's gradient: it is undefined again, as before any backward (its memory is freed). Never throws.
int nnsight_reset_grad(const at::Tensor *t) {
    try {
        if (t->defined()) {
            t->mutable_grad().reset();
        }
        return 0;
    } catch (...) {
        return 1;
    }
}

// The address of one function of libtorch_cuda (never called), or null where this libtorch has none. The linker
// keeps a shared library only when something references it; this reference, in a section marked `retain` and
// asked for by the runtime at load, keeps libtorch_cuda (and with it CUDA) in every program built on nnsight.
#ifdef NNSIGHT_KEEP_TORCH_CUDA
__attribute__((used, retain)) void *const nnsight_torch_cuda_symbol =
    reinterpret_cast<void *>(static_cast<at::Tensor (*)(const at::Tensor &)>(&at::cuda::relu));
#endif

void *nnsight_torch_cuda_anchor() {
#ifdef NNSIGHT_KEEP_TORCH_CUDA
    return nnsight_torch_cuda_symbol;
#else
    return nullptr;
#endif
}

}
