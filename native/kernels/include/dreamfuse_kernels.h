/* dreamfuse_kernels: the C ABI of dreamfuse's Triton kernels, compiled ahead of time to cubins.
 *
 * One launcher per op, with the shapes/strides contract of the Python op (kernels/attention.py, matching.py,
 * composite.py, lora.py): tensors are described by dfk_tensor (device pointer, dtype, shape, strides in elements, as
 * torch.Tensor.stride()), outputs are preallocated by the caller, work is enqueued on `stream` and never
 * synchronized. Every launcher checks its arguments on the host first and returns a dfk_status; on failure
 * dfk_last_error() holds one line naming the bad argument ("attention: q must be rank 4 (B, H, L, D), got 3").
 *
 * The CUDA driver is loaded at run time (dlopen "libcuda.so.1"): the library links no CUDA library, loads and runs
 * on machines without a GPU (launchers then return DFK_ERR_NO_DRIVER), and launches on the calling thread's current
 * CUDA context (the one the CUDA runtime, PyTorch or TensorRT made current). Cubins are loaded into a context on
 * first use and cached per context.
 *
 * Differences from the Python ops (the embedded variants; dfk_kernel_get lists them):
 *  - attention: head dims 40, 64, 80, 160; fp16/bf16 (AMA also fp32); strides along B, H, L multiples of 8
 *    elements, unit stride along D; the lse output is required (B, H, Lq) fp32 contiguous.
 *  - ama_attention: flow int32 or int64 (fp32: int32); mask in q's dtype.
 *  - match_argmax: unit stride along D; t2r/r2t int32 or int64, contiguous; needs a workspace.
 *  - cycle_mask: contiguous (B, N) tensors; t2r and r2t of one dtype; out in fg's dtype; needs a workspace.
 *  - composite_blend: masks (and the per-segment guidance) in the predictions' dtype; dense (h, w) planes.
 *  - lora_delta: fp16/bf16; d_in, d_out, r_max and the row strides multiples of 16 (pad a pool's r_max to one);
 *    unit stride along the last dim; index tensors contiguous; needs a workspace.
 * Integer sizes and strides must fit in int32 and data pointers must be 16-byte aligned (the kernels are compiled
 * with those assumptions); both are checked.
 */
#ifndef DREAMFUSE_KERNELS_H
#define DREAMFUSE_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#if defined(__GNUC__)
#define DFK_API __attribute__((visibility("default")))
#else
#define DFK_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* A CUstream (driver API) or cudaStream_t (runtime API): both are `struct CUstream_st *`. NULL is the legacy
 * default stream. */
struct CUstream_st;
typedef struct CUstream_st* dfk_stream;

typedef enum dfk_status {
    DFK_OK = 0,
    DFK_ERR_INVALID_ARGUMENT = 1, /* a shape, dtype, stride, pointer or scalar the op's contract rejects */
    DFK_ERR_NO_VARIANT = 2,       /* allowed by the op, but no embedded cubin covers it (head dim, dtype, GPU arch) */
    DFK_ERR_NO_DRIVER = 3,        /* libcuda.so.1 cannot be loaded or lacks a symbol: no NVIDIA driver here */
    DFK_ERR_CUDA = 4,             /* a CUDA driver call failed (no current context, module load, launch) */
    DFK_ERR_INTERNAL = 5          /* the embedded cubins do not match this library's launchers (rebuild both) */
} dfk_status;

typedef enum dfk_dtype {
    DFK_FLOAT16 = 0,
    DFK_BFLOAT16 = 1,
    DFK_FLOAT32 = 2,
    DFK_INT32 = 3,
    DFK_INT64 = 4
} dfk_dtype;

#define DFK_MAX_DIMS 5

typedef struct dfk_tensor {
    void* data;                     /* device pointer; may be NULL only when the tensor has no elements */
    dfk_dtype dtype;
    int32_t ndim;                   /* 0..DFK_MAX_DIMS */
    int64_t shape[DFK_MAX_DIMS];
    int64_t strides[DFK_MAX_DIMS];  /* in elements */
} dfk_tensor;

/* A tensor with row-major (contiguous) strides. */
DFK_API dfk_tensor dfk_tensor_contiguous(void* data, dfk_dtype dtype, int32_t ndim, const int64_t* shape);

/* The message of the last failed call on this thread ("" after a success). Valid until the next call. */
DFK_API const char* dfk_last_error(void);
DFK_API const char* dfk_status_name(dfk_status status);
/* "dreamfuse_kernels <version> (triton <v>, sm_80,sm_90)". */
DFK_API const char* dfk_version(void);

/* ------------------------------------------------------------------------------------------------- ops */

/* out = softmax(scale * q k^T) v, and lse = logsumexp of the scaled scores (natural log), fp32 accumulation.
 * q (B, H, Lq, D); k, v (B, H, Lk, D), one dtype (fp16, bf16); Lk >= 1; out like q; lse (B, H, Lq) fp32
 * contiguous. `scale` as in Python (D ** -0.5 there by default). */
DFK_API dfk_status dfk_attention(const dfk_tensor* q, const dfk_tensor* k, const dfk_tensor* v, double scale,
                                 const dfk_tensor* out, const dfk_tensor* lse, dfk_stream stream);

/* Attention over the values V_w[b,h,j] = mask[b,j] * v_ref[b,h,flow[b,j]] + (1 - mask[b,j]) * v_tgt[b,h,j],
 * formed while the V tiles load (DreamMatcher's AMA). v_tgt, v_ref (B, H, Lk, D) in q's dtype; flow (B, Lk)
 * int32/int64 (values outside [0, Lk) are clamped into it); mask (B, Lk) in q's dtype. */
DFK_API dfk_status dfk_ama_attention(const dfk_tensor* q, const dfk_tensor* k, const dfk_tensor* v_tgt,
                                     const dfk_tensor* v_ref, const dfk_tensor* flow, const dfk_tensor* mask,
                                     double scale, const dfk_tensor* out, const dfk_tensor* lse, dfk_stream stream);

/* Bytes of workspace dfk_match_argmax needs for (B, N, M) on any embedded arch (an upper bound). */
DFK_API size_t dfk_match_argmax_workspace_size(int64_t B, int64_t N, int64_t M);

/* Bidirectional cosine argmax, streamed (no N x M cost volume). f_tgt (B, N, D), f_ref (B, M, D), one dtype
 * (fp16, bf16, fp32), unit stride along D. t2r (B, N) and r2t (B, M) int32 or int64 (one dtype), contiguous;
 * t2r_sim (B, N), r2t_sim (B, M) fp32 contiguous, or NULL when not wanted. Ties go to the lowest index. */
DFK_API dfk_status dfk_match_argmax(const dfk_tensor* f_tgt, const dfk_tensor* f_ref, const dfk_tensor* t2r,
                                    const dfk_tensor* r2t, const dfk_tensor* t2r_sim, const dfk_tensor* r2t_sim,
                                    void* workspace, size_t workspace_size, dfk_stream stream);

/* Bytes of workspace dfk_cycle_mask needs for batch B. */
DFK_API size_t dfk_cycle_mask_workspace_size(int64_t B);

/* DreamMatcher's m' = fg * [ |coord(r2t[t2r[x]]) - coord(x)| < lambda_c * height * fg_ratio ] on a height x width
 * grid. t2r, r2t (B, N) int32/int64 contiguous, N = height * width; fg (B, N) fp16/bf16/fp32 contiguous; out like
 * fg. A t2r value outside [0, N) counts as inconsistent. lambda_c > 0. */
DFK_API dfk_status dfk_cycle_mask(const dfk_tensor* t2r, const dfk_tensor* r2t, const dfk_tensor* fg, int64_t height,
                                  int64_t width, double lambda_c, const dfk_tensor* out, void* workspace,
                                  size_t workspace_size, dfk_stream stream);

/* eps = sum_s m_s (u_s + g_s (c_s - u_s)) / max(sum_s m_s, 1e-6). eps_uncond, eps_cond (B, S, C, h, w) fp16/bf16/
 * fp32, any strides with dense (h, w) planes; masks (B, S, h, w) in their dtype; guidance: NULL for the scalar
 * guidance_scale, else a tensor broadcastable to (B, S) (rank <= 2) in their dtype; out (B, C, h, w) contiguous. */
DFK_API dfk_status dfk_composite_blend(const dfk_tensor* eps_uncond, const dfk_tensor* eps_cond,
                                       const dfk_tensor* masks, const dfk_tensor* guidance, double guidance_scale,
                                       const dfk_tensor* out, dfk_stream stream);

/* Bytes of workspace dfk_lora_delta needs: the shrink's (K, T, BLOCK_R) buffer in x's dtype, BLOCK_R = r_max
 * rounded up to a power of two >= 16. */
DFK_API size_t dfk_lora_delta_workspace_size(int64_t T, int64_t K, int64_t r_max, dfk_dtype dtype);

/* Grouped multi-LoRA delta (kernels/lora.py): for token t of segment s,
 *   out[t] = base[t] + sum_k seg_scale[s,k] * lora_b[a][:, :r] @ (lora_a[a][:r] @ x[t]),  a = seg_adapter[s,k],
 * r = ranks[a], over the slots with 0 <= a < N, a nonzero scale and r > 0 (others, and tokens outside
 * [seg_starts[0], seg_starts[S]), add nothing). x (T, d_in) fp16/bf16; lora_a (N, r_max, d_in), lora_b
 * (N, d_out, r_max) in x's dtype, 1 <= r_max <= 128 (lanes past a rank are never used); ranks (N,) int32 (clamped to
 * [0, r_max]); seg_starts (S + 1,) int32 nondecreasing within [0, T]; seg_adapter (S, K) int32 (-1: empty slot);
 * seg_scale (S, K) fp32; base (T, d_out) in x's dtype or NULL (then out = delta); out (T, d_out) contiguous. The
 * segment values are read on the device only. Two launches (shrink, expand) on `stream`. */
DFK_API dfk_status dfk_lora_delta(const dfk_tensor* x, const dfk_tensor* lora_a, const dfk_tensor* lora_b,
                                  const dfk_tensor* ranks, const dfk_tensor* seg_starts, const dfk_tensor* seg_adapter,
                                  const dfk_tensor* seg_scale, const dfk_tensor* base, const dfk_tensor* out,
                                  void* workspace, size_t workspace_size, dfk_stream stream);

/* ------------------------------------------------------------------------------------------------- introspection */

typedef struct dfk_kernel_info {
    const char* op;       /* the launcher: "attention", "ama_attention", "match_argmax", "match_inv_norm", ... */
    const char* key;      /* selection key, e.g. "dtype=fp16;head_dim=80" */
    const char* name;     /* unique variant name */
    int32_t arch;         /* compute capability the cubin was built for, e.g. 80, 90 */
    const char* entry;    /* the kernel's entry name in the cubin */
    const char* params;   /* launch parameters in order, "name:type" (type p = pointer, i32, fp32), comma separated */
    const char* grid;     /* the launch grid formula */
    int32_t num_warps, num_stages, shared_bytes;
    const void* cubin;
    size_t cubin_size;
} dfk_kernel_info;

DFK_API int32_t dfk_kernel_count(void);
DFK_API dfk_status dfk_kernel_get(int32_t index, dfk_kernel_info* info);
/* A constexpr the variant was compiled with (BLOCK_M, ...); -1 when it has none of that name. */
DFK_API int64_t dfk_kernel_constexpr(int32_t index, const char* name);
/* The SM a cubin (CUDA ELF) targets, e.g. 80 or 90; -1 if the bytes are not a CUDA ELF. */
DFK_API int32_t dfk_cubin_arch(const void* cubin, size_t size);

/* Loads the driver (once) and returns DFK_OK, or DFK_ERR_NO_DRIVER with the reason in dfk_last_error(). */
DFK_API dfk_status dfk_driver_check(void);

/* Dry run (this thread): sm > 0 makes the launchers check their arguments, select the variants for sm_<sm>
 * (num_sms streaming multiprocessors) and build every kernel's parameters and grid, then record the launches
 * instead of touching the driver. sm = 0 launches for real (the default). For tests and for validating a call
 * on a machine without a GPU. */
DFK_API void dfk_set_dry_run(int32_t sm, int32_t num_sms);

typedef struct dfk_launch_record {
    int32_t kernel;       /* index for dfk_kernel_get */
    uint32_t grid[3];
    uint32_t block;       /* threads per block: 32 * num_warps */
    uint32_t shared_bytes;
    int32_t num_params;
} dfk_launch_record;

/* The launches of the last op call on this thread (dry or real), oldest first; returns how many there were. */
DFK_API int32_t dfk_last_launches(dfk_launch_record* records, int32_t capacity);

/* Dry runs only: launch `index`'s kernel parameters as "name=value,..." (pointers in hex, i32 in decimal, fp32 as
 * %.9g) into buf; returns the full length (write nothing when buf is NULL), or -1 without such a launch. */
DFK_API int32_t dfk_last_launch_params(int32_t index, char* buf, size_t size);

#ifdef __cplusplus
}
#endif

#endif /* DREAMFUSE_KERNELS_H */
