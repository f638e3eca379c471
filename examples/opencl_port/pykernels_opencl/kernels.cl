// The three pykernels families in OpenCL C 1.2. Built at run time by the OpenCL driver found, once per
// (dtype, head dim): -DDT_F32 | -DDT_F16 | -DDT_BF16 picks the storage type, -DHD=<head dim> sizes the
// per-work-item arrays of attention and decode. Every product accumulates in float32.

#if defined(DT_F32)
typedef float T;
#define LD(p, i) ((p)[i])
#define ST(p, i, x) ((p)[i] = (x))
#elif defined(DT_F16)
// vload_half / vstore_half are core OpenCL: no cl_khr_fp16 needed to store half and compute in float.
typedef half T;
#define LD(p, i) vload_half((i), (p))
#define ST(p, i, x) vstore_half_rte((x), (i), (p))
#elif defined(DT_BF16)
// bfloat16 as its 16 raw bits: the upper half of a float32. Stores round to nearest even; NaN stays NaN.
typedef ushort T;
inline float bf16_to_f32(ushort x) { return as_float(((uint)x) << 16); }
inline ushort f32_to_bf16(float f) {
    if (isnan(f)) return (ushort)0x7FC0;
    uint u = as_uint(f);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (ushort)(u >> 16);
}
#define LD(p, i) bf16_to_f32((p)[i])
#define ST(p, i, x) ((p)[i] = f32_to_bf16(x))
#else
#error "define one of DT_F32, DT_F16, DT_BF16"
#endif

// ------------------------------------------------------------------------------------------------
// GEMM: C[M,N] = A[M,K] . B[K,N], row-major. A work-group of 8x8 work-items computes a 32x32 tile of C,
// each work-item a 4x4 block (rows ty*4.., columns tx + 8j) from 32x16 / 16x32 tiles of A and B staged
// in local memory. Out-of-range tile elements are zeros, so any M, N, K works.
#define TM 32
#define TN 32
#define TK 16
#define RM 4
#define RN 4
#define WX (TN / RN)
#define WY (TM / RM)

__kernel __attribute__((reqd_work_group_size(WX, WY, 1)))
void gemm(__global const T* a, __global const T* b, __global T* c, int M, int N, int K) {
    const int tx = get_local_id(0), ty = get_local_id(1);
    const int tid = ty * WX + tx;
    const int n0 = get_group_id(0) * TN, m0 = get_group_id(1) * TM;
    __local float As[TM][TK + 1];
    __local float Bs[TK][TN];
    float acc[RM][RN];
    for (int i = 0; i < RM; ++i)
        for (int j = 0; j < RN; ++j) acc[i][j] = 0.0f;

    for (int k0 = 0; k0 < K; k0 += TK) {
        for (int t = tid; t < TM * TK; t += WX * WY) {
            const int r = t / TK, kk = t % TK, gm = m0 + r, gk = k0 + kk;
            As[r][kk] = (gm < M && gk < K) ? LD(a, (size_t)gm * K + gk) : 0.0f;
        }
        for (int t = tid; t < TK * TN; t += WX * WY) {
            const int kk = t / TN, cc = t % TN, gk = k0 + kk, gn = n0 + cc;
            Bs[kk][cc] = (gk < K && gn < N) ? LD(b, (size_t)gk * N + gn) : 0.0f;
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        for (int kk = 0; kk < TK; ++kk) {
            float ar[RM], br[RN];
            for (int i = 0; i < RM; ++i) ar[i] = As[ty * RM + i][kk];
            for (int j = 0; j < RN; ++j) br[j] = Bs[kk][tx + j * WX];
            for (int i = 0; i < RM; ++i)
                for (int j = 0; j < RN; ++j) acc[i][j] = fma(ar[i], br[j], acc[i][j]);
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    for (int i = 0; i < RM; ++i) {
        const int gm = m0 + ty * RM + i;
        if (gm >= M) continue;
        for (int j = 0; j < RN; ++j) {
            const int gn = n0 + tx + j * WX;
            if (gn < N) ST(c, (size_t)gm * N + gn, acc[i][j]);
        }
    }
}

// Decode-sized GEMM (M <= SMALL_M): the 32-row tile above would compute mostly zeros for M = 1. One
// work-item per output column, all M rows at once, so B is streamed once; neighbouring work-items read
// neighbouring columns of B.
#define SMALL_M 8
__kernel void gemm_small_m(__global const T* a, __global const T* b, __global T* c, int M, int N, int K) {
    const int n = get_global_id(0);
    if (n >= N) return;
    float acc[SMALL_M];
    for (int m = 0; m < SMALL_M; ++m) acc[m] = 0.0f;
    for (int k = 0; k < K; ++k) {
        const float bk = LD(b, (size_t)k * N + n);
        for (int m = 0; m < SMALL_M; ++m)
            if (m < M) acc[m] = fma(LD(a, (size_t)m * K + k), bk, acc[m]);
    }
    for (int m = 0; m < M; ++m) ST(c, (size_t)m * N + n, acc[m]);
}

// ------------------------------------------------------------------------------------------------
// Online-softmax update of one score s against the running max m, sum l and accumulator acc. Written
// with a comparison, not fmax, so that a NaN score propagates (fmax would drop it).
#define ONLINE_STEP(s, m, l, acc, vrow_expr)                                  \
    do {                                                                      \
        const float m_new = (s) > (m) ? (s) : (m);                            \
        const float alpha = exp((m) - m_new);                                 \
        const float p = exp((s) - m_new);                                     \
        (l) = (l) * alpha + p;                                                \
        for (int d = 0; d < HD; ++d) (acc)[d] = (acc)[d] * alpha + p * (vrow_expr); \
        (m) = m_new;                                                          \
    } while (0)

// ------------------------------------------------------------------------------------------------
// Attention (prefill, flash-style): q [B,Hq,S,HD], k, v [B,Hkv,S,HD] -> o [B,Hq,S,HD]. A work-group of
// BQ work-items takes BQ consecutive query rows of one (b, head); key/value rows are staged BK at a time
// in local memory and every work-item runs its own online softmax over them. Grouped-query heads read
// kv head h / (Hq / Hkv).
#define BQ 32
#if HD > 128
#define BK 16
#else
#define BK 32
#endif

__kernel __attribute__((reqd_work_group_size(BQ, 1, 1)))
void attention(__global const T* q, __global const T* k, __global const T* v, __global T* o,
               int Hq, int Hkv, int S, float scale, int causal) {
    const int li = get_local_id(0);
    const int i = get_group_id(0) * BQ + li;
    const int bh = get_group_id(1);
    const int b = bh / Hq, h = bh % Hq, hk = h / (Hq / Hkv);
    const bool active = i < S;
    const size_t qo = ((size_t)bh * S + (active ? i : 0)) * HD;
    const size_t kvbase = ((size_t)b * Hkv + hk) * S * HD;
    __local float ks[BK][HD];
    __local float vs[BK][HD];
    float qr[HD], acc[HD];
    for (int d = 0; d < HD; ++d) {
        qr[d] = LD(q, qo + d) * scale;
        acc[d] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    // The key range is the same for the whole group (barriers): up to the group's last row when causal.
    const int last_row = min(S, (int)(get_group_id(0) + 1) * BQ);
    const int kend = causal ? last_row : S;
    for (int j0 = 0; j0 < kend; j0 += BK) {
        barrier(CLK_LOCAL_MEM_FENCE);
        for (int t = li; t < BK * HD; t += BQ) {
            const int r = t / HD, d = t % HD, j = j0 + r;
            ks[r][d] = j < S ? LD(k, kvbase + (size_t)j * HD + d) : 0.0f;
            vs[r][d] = j < S ? LD(v, kvbase + (size_t)j * HD + d) : 0.0f;
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        if (active) {
            const int jn = min(BK, (causal ? i + 1 : S) - j0);
            for (int r = 0; r < jn; ++r) {
                float s = 0.0f;
                for (int d = 0; d < HD; ++d) s = fma(qr[d], ks[r][d], s);
                ONLINE_STEP(s, m, l, acc, vs[r][d]);
            }
        }
    }
    if (active)
        for (int d = 0; d < HD; ++d) ST(o, qo + d, acc[d] / l);
}

// ------------------------------------------------------------------------------------------------
// Decode: q [B,Hq,HD] against a cache -> o [B,Hq,HD]. Contiguous cache [B,Hkv,Lmax,HD] is the paged
// layout with one block of Lmax rows per sequence (block = b), so one kernel serves both: row j of
// sequence b lives in block block_table[b, j / bs] (paged) at row j % bs. A work-group of DW work-items
// per (b, query head) splits the context round-robin, each with its own online softmax; the partial
// results are merged through local memory. Rows at or past context_lens[b] are never read.
#if HD > 128
#define DW 16
#else
#define DW 32
#endif

__kernel __attribute__((reqd_work_group_size(DW, 1, 1)))
void decode(__global const T* q, __global const T* kc, __global const T* vc, __global const int* lens,
            __global const int* block_table, __global T* o, int paged, int max_blocks, int Hq, int Hkv, int bs,
            float scale) {
    const int li = get_local_id(0);
    const int bh = get_group_id(0);
    const int b = bh / Hq, h = bh % Hq, hk = h / (Hq / Hkv);
    const int n = lens[b];
    float qr[HD], acc[HD];
    for (int d = 0; d < HD; ++d) {
        qr[d] = LD(q, (size_t)bh * HD + d) * scale;
        acc[d] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    for (int j = li; j < n; j += DW) {
        const int blk = paged ? block_table[(size_t)b * max_blocks + j / bs] : b;
        const size_t row = (((size_t)blk * Hkv + hk) * bs + (j % bs)) * HD;
        float s = 0.0f;
        for (int d = 0; d < HD; ++d) s = fma(qr[d], LD(kc, row + d), s);
        ONLINE_STEP(s, m, l, acc, LD(vc, row + d));
    }
    // Merge: the group's max, then every work-item's share rescaled to it.
    __local float ms[DW], ls[DW];
    __local float red[DW][HD];
    ms[li] = m;
    barrier(CLK_LOCAL_MEM_FENCE);
    float gm = -INFINITY;
    for (int t = 0; t < DW; ++t) gm = ms[t] > gm ? ms[t] : gm;
    // A work-item with no rows (li >= n) has l = 0 and contributes nothing. One whose scores were NaN has
    // m = -inf and l = NaN: NaN * 0 is still NaN, so the NaN reaches the sum.
    const float w = (l == 0.0f) ? 0.0f : exp(m - gm);
    ls[li] = l * w;
    for (int d = 0; d < HD; ++d) red[li][d] = acc[d] * w;
    barrier(CLK_LOCAL_MEM_FENCE);
    if (li == 0) {
        float L = 0.0f;
        for (int t = 0; t < DW; ++t) L += ls[t];
        for (int d = 0; d < HD; ++d) {
            float sum = 0.0f;
            for (int t = 0; t < DW; ++t) sum += red[t][d];
            ST(o, (size_t)bh * HD + d, sum / L);
        }
    }
}
